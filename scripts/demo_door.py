"""The replica's door: a read-write client connected to the REPLICA's
address commits (its session is forwarded to the primary) and reads its own
write back at once (served by the replica when it has applied it).

Usage: demo_door.py REPLICA_ADDR PRIMARY_ADDR"""
import sys
import time

import ZODB
from ZEO.ClientStorage import ClientStorage


def addr(s):
    host, port = s.rsplit(":", 1)
    return (host, int(port))


door, primary = addr(sys.argv[1]), addr(sys.argv[2])
db = ZODB.DB(ClientStorage(door, wait_timeout=10))
stamp = round(time.time(), 6)
with db.transaction("demo: written through the replica's door") as conn:
    conn.root()["door_stamp"] = stamp
tid = db.storage.lastTransaction().hex()
with db.transaction() as conn:
    got = conn.root()["door_stamp"]
db.close()
print(f"read-write client at the replica {door}: committed door_stamp={stamp} "
      f"(tid {tid}), read back {got}")

pdb = ZODB.DB(ClientStorage(primary, wait_timeout=10, read_only=True))
with pdb.transaction() as conn:
    on_primary = conn.root().get("door_stamp")
pdb.close()
print(f"the primary {primary} has door_stamp={on_primary}: the write went "
      f"through the replica's door to the primary")
if got != stamp or on_primary != stamp:
    sys.exit("the door round trip did not see its own write")
