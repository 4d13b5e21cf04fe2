//! mysql backend for leaselock (in progress).
