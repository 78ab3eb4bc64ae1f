//! `wskeep bench`: the load generator behind the README's figures, and the neutral echo upstream
//! it measures against.

pub mod echo;
