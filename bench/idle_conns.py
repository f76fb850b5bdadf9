"""Opens N keep-alive connections to a listener, one request each, and reports RSS growth."""
import socket
import sys
import time

pid, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])


def rss_kib():
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1])
    return 0


base = rss_kib()
socks = []
for _ in range(n):
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"GET /nothing HTTP/1.1\r\nHost: localhost\r\n\r\n")
    socks.append(s)
time.sleep(1)
for s in socks:
    s.recv(4096)
time.sleep(1)
after = rss_kib()
per_1000 = (after - base) * 1000 / n / 1024
print(f"idle keep-alive connections: {n}; RSS {base} KiB -> {after} KiB; {per_1000:.1f} MiB per 1,000")
