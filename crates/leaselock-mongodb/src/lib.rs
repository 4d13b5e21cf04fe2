//! mongodb backend for leaselock (in progress).
