//! The learning platform's services as plain apps. They know nothing of TLS, retries or AMQP:
//! they call other services through their sidecar on localhost and receive requests from it.
