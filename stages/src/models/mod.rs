//! Networks in tch.
