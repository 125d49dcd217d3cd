import { defineConfig } from "vitest/config";

export default defineConfig({
  test: {
    include: ["test/**/*.test.ts"],
    globalSetup: ["test/helpers/global-setup.ts"],
    testTimeout: 30_000,
    hookTimeout: 120_000,
    // 2-core machines: two workers keep PostgreSQL and the servers from starving each other.
    maxWorkers: 2,
  },
});
