#!/usr/bin/python3
"""Static checks of docker/compose.yml, or of the file named as the first
argument (docker/compose-ha.yml), run by scripts/docker-check.sh with
the distribution's Python: python3-yaml and python3-jsonschema come with the
docker-compose package).

- validates the file against the compose-spec JSON schema (the one
  docker-compose ships), when it is installed;
- every host file or directory it mounts exists;
- services named in network_mode / depends_on exist;
- [coordinator] endpoints name a service of the file (etcd);
- ports: each zrelay service publishes the client and admin ports its
  config listens on; Prometheus scrapes every zrelay admin port; the
  healthcheck's default admin URL matches the configs;
- metrics: every zrelay_* metric in the mounted alert rules and dashboard
  is documented in docs/metrics.md (the code <-> doc check is
  tests/dashboards.rs).
Prints one line per check; exits 1 on the first failure list.
"""
import json
import os
import re
import sys
import tomllib

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCKER = os.path.join(ROOT, 'docker')
SCHEMAS = ['/usr/lib/python3/dist-packages/compose/config/compose_spec.json']
failures = []


def fail(msg):
    failures.append(msg)
    print(f'FAIL {msg}')


def ok(msg):
    print(f'ok   {msg}')


def main():
    path = os.path.join(DOCKER, sys.argv[1] if len(sys.argv) > 1 else 'compose.yml')
    print(f'checking {os.path.relpath(path, ROOT)}')
    with open(path) as f:
        doc = yaml.safe_load(f)
    ok('compose.yml parses as YAML')
    schema = next((s for s in SCHEMAS if os.path.exists(s)), None)
    if schema:
        import jsonschema
        with open(schema) as f:
            spec = json.load(f)
        errors = list(jsonschema.Draft7Validator(spec).iter_errors(doc))
        for e in errors:
            fail(f'schema: {"/".join(map(str, e.path))}: {e.message}')
        if not errors:
            ok(f'valid against {schema}')
    else:
        fail('no compose-spec schema found (install docker-compose: scripts/ensure-docker-tools.sh)')

    services = doc['services']
    for name, svc in services.items():
        for v in svc.get('volumes', []):
            src = v.split(':')[0]
            if src.startswith('.') or src.startswith('/'):
                p = os.path.normpath(os.path.join(DOCKER, src))
                if os.path.exists(p):
                    ok(f'{name}: mounts {os.path.relpath(p, ROOT)}')
                else:
                    fail(f'{name}: mounts {src}, which does not exist')
            elif src not in (doc.get('volumes') or {}):
                fail(f'{name}: named volume {src} is not declared')
        nm = svc.get('network_mode', '')
        if nm.startswith('service:') and nm[8:] not in services:
            fail(f'{name}: network_mode {nm}: no such service')
        deps = svc.get('depends_on', [])
        for d in deps if isinstance(deps, list) else deps.keys():
            if d not in services:
                fail(f'{name}: depends_on {d}: no such service')

    # zrelay services: the config they mount, its ports, what is published.
    admin_ports = {}
    for name, svc in services.items():
        cfgs = [v.split(':')[0] for v in svc.get('volumes', [])
                if v.split(':')[1:2] == ['/etc/zrelay/zrelay.toml']]
        if not cfgs:
            continue
        with open(os.path.normpath(os.path.join(DOCKER, cfgs[0])), 'rb') as f:
            cfg = tomllib.load(f)
        published = {int(p.split(':')[-1]) for p in svc.get('ports', [])}
        for key in ('client', 'admin'):
            port = int(cfg[key]['listen'].rsplit(':', 1)[1])
            if port in published:
                ok(f'{name}: publishes its {key} port {port}')
            else:
                fail(f'{name}: {key}.listen port {port} is not in ports {sorted(published)}')
        admin_ports[name] = int(cfg['admin']['listen'].rsplit(':', 1)[1])
        backend = cfg['backend']['address']
        if not backend.startswith('127.0.0.1:'):
            fail(f'{name}: backend {backend} is not on loopback')
        zeo = [s for s, d in services.items()
               if d.get('network_mode') == f'service:{name}']
        if zeo:
            ok(f'{name}: runzeo {zeo[0]} shares its network namespace, backend {backend}')
        else:
            fail(f'{name}: no runzeo service shares its network namespace')
        up = cfg.get('replication', {}).get('upstream')
        if up:
            host, port = up.rsplit(':', 1)
            target = services.get(host)
            if target is None:
                fail(f'{name}: upstream {up}: no such service')
        for ep in cfg.get('coordinator', {}).get('endpoints', []):
            host = ep.split('://', 1)[-1].rsplit(':', 1)[0]
            if host in services:
                ok(f'{name}: coordinator endpoint {ep} is service {host}')
            else:
                fail(f'{name}: coordinator endpoint {ep}: no such service')
    with open(os.path.join(DOCKER, 'config', 'zeo.conf')) as f:
        zeo_conf = f.read()
    if re.search(r'address\s+127\.0\.0\.1:8200', zeo_conf):
        ok('zeo.conf binds 127.0.0.1:8200 (the configs\' backend)')
    else:
        fail('zeo.conf does not bind 127.0.0.1:8200')

    with open(os.path.join(DOCKER, 'prometheus.yml')) as f:
        prom = yaml.safe_load(f)
    targets = {t for sc in prom['scrape_configs']
               for st in sc['static_configs'] for t in st['targets']}
    want = {f'{n}:{p}' for n, p in admin_ports.items()}
    if 'prometheus' not in services:
        ok('no prometheus service in this file (scrape targets not checked)')
    elif targets == want:
        ok(f'prometheus scrapes every zrelay admin port: {sorted(targets)}')
    else:
        fail(f'prometheus targets {sorted(targets)} != zrelay admin ports {sorted(want)}')
    with open(os.path.join(DOCKER, 'Dockerfile')) as f:
        m = re.search(r'ZRELAY_ADMIN_URL=http://127\.0\.0\.1:(\d+)', f.read())
    hc = int(m.group(1)) if m else None
    if hc is not None and all(p == hc for p in admin_ports.values()):
        ok(f'image HEALTHCHECK probes admin port {hc}, as every zrelay config listens')
    else:
        fail(f'image HEALTHCHECK port {hc} != admin ports {admin_ports}')

    with open(os.path.join(ROOT, 'docs', 'metrics.md')) as f:
        documented = set(re.findall(r'`(zrelay_[a-z_]+)`', f.read()))
    for rel in ('dashboards/zrelay-alerts.yml', 'dashboards/zrelay-grafana.json'):
        with open(os.path.join(ROOT, rel)) as f:
            names = set(re.findall(r'zrelay_[a-z_]+', f.read()))
        names = {re.sub(r'_(bucket|sum|count)$', '', n) for n in names}
        missing = sorted(n for n in names if n not in documented)
        if missing:
            fail(f'{rel}: metrics not in docs/metrics.md: {missing}')
        else:
            ok(f'{rel}: {len(names)} metrics, all documented')
    if failures:
        print(f'{len(failures)} compose check(s) failed', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
