//! postgres backend for leaselock (in progress).
