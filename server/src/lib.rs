//! si server
