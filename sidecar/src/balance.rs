//! Endpoint selection (issue 4).
