// Builds the web client (index.html) and the status page (status.html) into dist/, which the gateway
// serves at / and /status. `npm run dev` serves them with the API proxied to a local `parley dev`.
import { resolve } from 'node:path';
import { defineConfig } from 'vite';

export default defineConfig({
  oxc: { jsx: { runtime: 'automatic', importSource: 'preact' } },
  build: {
    outDir: 'dist',
    emptyOutDir: true,
    rollupOptions: {
      input: {
        index: resolve(import.meta.dirname, 'index.html'),
        status: resolve(import.meta.dirname, 'status.html'),
      },
    },
  },
  server: { proxy: { '/v1': 'http://127.0.0.1:8080' } },
});
