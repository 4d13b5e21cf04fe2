//! dynamodb backend for leaselock (in progress).
