//! si agent
