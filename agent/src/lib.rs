//! si agent

pub mod layout;
