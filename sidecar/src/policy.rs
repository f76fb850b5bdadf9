//! Policy layers (issue 4).
