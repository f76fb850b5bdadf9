//! Free loopback ports. Apart from the rest of `support` so that test binaries which start
//! their own sidecars (broker, discovery, inject) can include just this file:
//! `#[path = "support/ports.rs"] mod ports;`.
#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener};

/// `N` distinct free ports on 127.0.0.1: all are held until every one is chosen, since a port
/// released at once may be handed out again by the next bind (seen: admin == outbound).
pub fn free_addrs<const N: usize>() -> [SocketAddr; N] {
    let held: [TcpListener; N] =
        std::array::from_fn(|_| TcpListener::bind("127.0.0.1:0").expect("bind"));
    held.map(|l| l.local_addr().expect("addr"))
}

/// A free port on 127.0.0.1 (bound and released; collisions between tests are unlikely).
pub fn free_addr() -> SocketAddr {
    let [addr] = free_addrs();
    addr
}

/// [`free_addr`]'s port.
pub fn free_port() -> u16 {
    free_addr().port()
}
