"""Opens N keep-alive connections to a listener, one request each, and reports RSS growth.

Prints the sidecar's RSS and open file descriptors before and after, how long opening took, and
how many of the connections the sidecar still kept open at the measurement (and, when
HOLD seconds > 0, after holding them idle that long)."""
import os
import socket
import sys
import time

pid, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
hold = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0


def rss_kib():
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1])
    return 0


def fds():
    return len(os.listdir(f"/proc/{pid}/fd"))


def still_open(socks):
    """Connections the server has not closed (no EOF waiting to be read)."""
    alive = 0
    for s in socks:
        s.setblocking(False)
        try:
            if s.recv(1, socket.MSG_PEEK):
                alive += 1  # unexpected data, but open
        except BlockingIOError:
            alive += 1
        except OSError:
            pass
        s.setblocking(True)
    return alive


base, base_fds = rss_kib(), fds()
started = time.monotonic()
socks = []
slowest = 0.0
for _ in range(n):
    t = time.monotonic()
    s = socket.create_connection(("127.0.0.1", port))
    slowest = max(slowest, time.monotonic() - t)
    s.sendall(b"GET /nothing HTTP/1.1\r\nHost: localhost\r\n\r\n")
    socks.append(s)
opened = time.monotonic() - started
time.sleep(1)
for s in socks:
    s.recv(4096)
time.sleep(1)
after, after_fds = rss_kib(), fds()
alive = still_open(socks)
per_1000 = (after - base) * 1000 / n / 1024
print(
    f"idle keep-alive connections: {n} (opened in {opened:.1f} s, slowest connect "
    f"{slowest * 1000:.0f} ms; {alive} still open); "
    f"RSS {base} KiB -> {after} KiB; {per_1000:.1f} MiB per 1,000; fds {base_fds} -> {after_fds}"
)
if hold > 0:
    time.sleep(hold)
    print(
        f"after {hold:.0f} s more idle: {still_open(socks)} still open; RSS {rss_kib()} KiB; "
        f"fds {fds()}"
    )
