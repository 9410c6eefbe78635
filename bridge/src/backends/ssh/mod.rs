//! Owned hosts driven over SSH. [`session`] is the client: one
//! authenticated connection to a host whose key is pinned, running
//! commands on it, and a reconnecting link for a backend to hold.

pub mod session;
