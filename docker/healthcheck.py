"""Container health: GET $ZRELAY_ADMIN_URL/health (default
http://127.0.0.1:8300/health) answers 200. Exit 0 healthy, 1 not."""
import os
import sys
import urllib.request

url = os.environ.get('ZRELAY_ADMIN_URL', 'http://127.0.0.1:8300').rstrip('/')
try:
    with urllib.request.urlopen(url + '/health', timeout=2) as r:
        sys.exit(0 if r.status == 200 else 1)
except Exception as e:  # refused, 503 (HTTPError), timeout
    print(f'unhealthy: {e}', file=sys.stderr)
    sys.exit(1)
