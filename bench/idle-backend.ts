/** A minimal SMTP backend in a process of its own, for the idle-connection workload. */
import { startFakeBackend } from '../test/helpers/fake-backend.js';

const fb = await startFakeBackend('none');
process.stdout.write(`port ${fb.port}\n`);
process.on('SIGTERM', () => void fb.close().then(() => process.exit(0)));
