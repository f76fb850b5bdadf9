//! Discovery (issue 5).
