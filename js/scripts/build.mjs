// Builds the SDK: dist/tern.js (ES module), dist/tern.min.js (minified, the browser bundle),
// dist/types/ (declarations, by tsc), and copies the minified bundle to edge/demo/ (the
// demo the node embeds). Prints the minified bundle's gzip size and fails above the budget.
//
//   npm run build            build
//   npm run build -- --check also fail when edge/demo/tern.min.js differs from the build
import { build } from 'esbuild';
import { execFileSync } from 'node:child_process';
import { readFileSync, writeFileSync, existsSync } from 'node:fs';
import { gzipSync } from 'node:zlib';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

/** The budget for dist/tern.min.js, gzip -9, in bytes (the aim: 15 KB). */
const BUDGET_GZIP_BYTES = 15 * 1024;

const JS = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const DEMO_COPY = path.resolve(JS, '..', 'edge', 'demo', 'tern.min.js');
const common = { entryPoints: [path.join(JS, 'src/index.ts')], bundle: true, format: 'esm', target: 'es2022', legalComments: 'none' };

await build({ ...common, outfile: path.join(JS, 'dist/tern.js') });
await build({ ...common, outfile: path.join(JS, 'dist/tern.min.js'), minify: true });
execFileSync(path.join(JS, 'node_modules/.bin/tsc'), ['-p', JS], { stdio: 'inherit' });

const min = readFileSync(path.join(JS, 'dist/tern.min.js'));
const gz = gzipSync(min, { level: 9 }).length;
console.log(`dist/tern.min.js: ${min.length} bytes, ${gz} bytes gzip (budget ${BUDGET_GZIP_BYTES})`);
if (gz > BUDGET_GZIP_BYTES) {
  console.error(`the bundle is over its budget by ${gz - BUDGET_GZIP_BYTES} bytes gzip`);
  process.exit(1);
}
if (process.argv.includes('--check')) {
  if (!existsSync(DEMO_COPY) || !readFileSync(DEMO_COPY).equals(min)) {
    console.error(`${DEMO_COPY} is not the current build: run 'npm run build' in js/ and commit it`);
    process.exit(1);
  }
} else {
  writeFileSync(DEMO_COPY, min);
}
