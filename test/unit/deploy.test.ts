/**
 * What can be checked of the deployment files without a Docker engine: the compose file's build
 * contexts and bind-mount sources exist; doorman's environment there is a valid configuration;
 * Prometheus scrapes the port doorman serves metrics on (and promtool accepts the file when it is
 * installed); the Dockerfile runs as non-root with a HEALTHCHECK on /healthz, on the Node.js LTS
 * that scripts/node.sh installs and CI tests; the Grafana provisioning points at the dashboard the
 * compose file mounts.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { parse } from 'yaml';
import { ENV_VARS, loadConfig } from '../../src/config/load.js';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const read = (f: string) => fs.readFileSync(path.join(ROOT, f), 'utf8');

interface Service {
  build?: string;
  image?: string;
  environment?: Record<string, string>;
  volumes?: string[];
  command?: string[];
}
const compose = parse(read('docker-compose.yml')) as { services: Record<string, Service> };
/** The milter alternative: Postfix keeps port 25 and calls doorman's milter listener. */
const milterCompose = parse(read('docker-compose.milter.yml')) as { services: Record<string, Service> };

test('compose: build contexts and bind-mount sources exist; images are named (both set-ups)', () => {
  for (const [name, svc] of [...Object.entries(compose.services), ...Object.entries(milterCompose.services)]) {
    assert.ok(svc.build || svc.image, `${name} has a build or an image`);
    if (svc.build) assert.ok(fs.existsSync(path.join(ROOT, svc.build, 'Dockerfile')), `${name}: build context`);
    for (const v of svc.volumes ?? []) {
      const src = v.split(':')[0] ?? '';
      if (src.startsWith('.')) assert.ok(fs.existsSync(path.join(ROOT, src)), `${name}: ${src}`);
    }
  }
});

test('compose: doorman’s environment is a valid configuration with the shipped rules', () => {
  const env = compose.services.doorman?.environment ?? {};
  for (const k of Object.keys(env)) assert.ok(k in ENV_VARS, `${k} is a doorman variable`);
  const { config } = loadConfig({ env: { ...env, DOORMAN_RULES: path.join(ROOT, 'rules') }, cwd: ROOT });
  assert.equal(config.listen[0]?.address, '0.0.0.0:2525');
  const promCfg = parse(read('deploy/prometheus.yml')) as { scrape_configs: { static_configs: { targets: string[] }[] }[] };
  const target = promCfg.scrape_configs[0]?.static_configs[0]?.targets[0] ?? '';
  assert.equal(target.split(':')[1], config.metrics.listen.split(':')[1], 'Prometheus scrapes the metrics port');
  assert.equal(target.split(':')[0], 'doorman');
});

test('compose, milter set-up: doorman serves a milter that Postfix is pointed at, with a safe default action', () => {
  const env = milterCompose.services.doorman?.environment ?? {};
  for (const k of Object.keys(env)) assert.ok(k in ENV_VARS, `${k} is a doorman variable`);
  const { config } = loadConfig({ env: { ...env, DOORMAN_RULES: path.join(ROOT, 'rules') }, cwd: ROOT });
  assert.deepEqual([config.listen[0]?.role, config.listen[0]?.address], ['milter', '0.0.0.0:8890']);
  const pf = milterCompose.services.postfix?.environment ?? {};
  assert.equal(pf.POSTFIX_smtpd_milters, `inet:doorman:${config.listen[0]?.address.split(':')[1]}`);
  assert.equal(pf.POSTFIX_milter_default_action, 'accept');
});

test('promtool accepts the Prometheus configuration (when installed)', (t) => {
  try {
    execFileSync('promtool', ['--version'], { stdio: 'ignore' });
  } catch {
    t.skip('promtool not installed');
    return;
  }
  execFileSync('promtool', ['check', 'config', path.join(ROOT, 'deploy', 'prometheus.yml')], { stdio: 'pipe' });
});

test('Dockerfile: multi-stage, non-root, HEALTHCHECK on /healthz, the doorman entrypoint', () => {
  const df = read('Dockerfile');
  assert.equal((df.match(/^FROM /gm) ?? []).length, 2);
  assert.match(df, /^USER node$/m);
  assert.match(df, /^HEALTHCHECK .*\n?.*\/healthz/m);
  assert.match(df, /^ENTRYPOINT \["node", "bin\/doorman\.js"\]$/m);
  assert.match(df, /^\s+NODE_OPTIONS=--max-semi-space-size=32 \\$/m, 'the tuned young generation, as install.sh and the bench use');
  assert.match(read('scripts/install.sh'), /NODE_OPTIONS:---max-semi-space-size=32/);
});

test('one Node.js story: the image, the LTS the scripts download, engines and the lines CI runs', () => {
  const lts = /^DOORMAN_NODE_LTS=(\d+)\b/m.exec(read('scripts/node.sh'))?.[1];
  assert.equal(lts, '24', 'scripts/node.sh installs the current LTS');
  const froms = read('Dockerfile').match(/^FROM \S+/gm) ?? [];
  assert.deepEqual(froms.map((f) => f.replace(/ AS .*/, '')), [`FROM node:${lts}-bookworm-slim`, `FROM node:${lts}-bookworm-slim`]);
  const pkg = JSON.parse(read('package.json')) as { engines: { node: string } };
  assert.equal(pkg.engines.node, '^22.19.0 || >=24');
  assert.match(read('.ci/run'), /^for major in 22 24; do$/m, 'CI runs the suite on both LTS lines');
  assert.match(read('.ci/run'), /DOORMAN_NODE_MAJOR=\$major \.\/scripts\/test\.sh/, "through the README's test command");
  for (const f of ['scripts/install.sh', 'scripts/test.sh']) assert.match(read(f), /^\. scripts\/node\.sh\nuse_supported_node$/m, f);
  assert.match(read('.gitignore'), /^\.node\/$/m);
});

test('Grafana provisioning: the datasource uid and the dashboard path match the compose mounts', () => {
  const ds = parse(read('grafana/provisioning/datasources/prometheus.yaml')) as { datasources: { url: string }[] };
  assert.equal(ds.datasources[0]?.url, 'http://prometheus:9090');
  const prov = parse(read('grafana/provisioning/dashboards/doorman.yaml')) as { providers: { options: { path: string } }[] };
  const dir = prov.providers[0]?.options.path ?? '';
  assert.ok((compose.services.grafana?.volumes ?? []).some((v) => v.endsWith(`${dir}/doorman.json:ro`)));
  const dash = JSON.parse(read('grafana/doorman.json')) as { templating: { list: { name: string; type: string }[] } };
  assert.ok(dash.templating.list.some((v) => v.type === 'datasource'), 'a datasource variable');
});
