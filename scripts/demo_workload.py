"""A small sample workload: commit through one address, read back through
another (the same one unless a second is given)."""
import sys
import time

import transaction
import ZODB
from BTrees.OOBTree import OOBTree
from persistent.mapping import PersistentMapping
from ZEO.ClientStorage import ClientStorage


def addr(s):
    host, port = s.rsplit(":", 1)
    return (host, int(port))


write_addr = addr(sys.argv[1])
read_addr = addr(sys.argv[2]) if len(sys.argv) > 2 else write_addr

db = ZODB.DB(ClientStorage(write_addr, wait_timeout=10))
with db.transaction("demo: create") as conn:
    root = conn.root()
    if "articles" not in root:
        root["articles"] = OOBTree()
    n = len(root["articles"])
    for i in range(n, n + 10):
        root["articles"][f"a{i:04}"] = PersistentMapping(title=f"Article {i}")
    root["stamp"] = time.time()
    stamp = root["stamp"]
# repr on both sides: the exact float, so equal values print identically.
print(f"committed 10 articles (now {n + 10}) and stamp={stamp!r} via {write_addr}")
last = db.storage.lastTransaction().hex()
db.close()

rdb = ZODB.DB(ClientStorage(read_addr, wait_timeout=10, read_only=read_addr != write_addr))
deadline = time.monotonic() + 10
while True:
    conn = rdb.open()
    got = conn.root().get("stamp")
    count = len(conn.root().get("articles", ()))
    conn.close()
    if got == stamp or time.monotonic() > deadline:
        break
    time.sleep(0.05)
    rdb.storage.sync() if hasattr(rdb.storage, "sync") else None
print(f"read back via {read_addr}: stamp={got!r} articles={count} (last tid {last})")
rdb.close()
if got != stamp:
    sys.exit("read-back did not see the committed stamp")
