//! The RabbitMQ bridge (issue 6).
