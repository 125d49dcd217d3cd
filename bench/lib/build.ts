/**
 * The children (servers, load generator, followers) run as plain JavaScript,
 * as the vault does in production (`node dist/main.js`), not under tsx: tsx's
 * loader keeps a second V8 isolate (the module-hooks thread) in the process,
 * which would add tens of MB to the RSS measured. src/ and bench/ are
 * transpiled file by file (no bundling, so CPU profiles still name src files)
 * with esbuild, which tsx already brings, into bench/.build/ (git-ignored).
 * Without esbuild the children run under tsx and the RSS says so.
 */
import { copyFileSync, mkdirSync, readdirSync, rmSync } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";

/** The repository's root folder. */
export const repoRoot = fileURLToPath(new URL("../../", import.meta.url));
/** Where the transpiled tree goes. */
export const buildDir = path.join(repoRoot, "bench", ".build");

function tsFiles(dir: string): string[] {
  return (readdirSync(path.join(repoRoot, dir), { recursive: true }) as string[])
    .filter((f) => f.endsWith(".ts") && !f.endsWith(".d.ts") && !f.startsWith(".build"))
    .map((f) => path.join(repoRoot, dir, f));
}

/** Transpiles src/ and bench/ into bench/.build/; returns false (children then run under tsx) when esbuild is missing. */
export async function buildChildren(): Promise<boolean> {
  let esbuild: typeof import("esbuild");
  try {
    esbuild = await import("esbuild");
  } catch {
    return false;
  }
  rmSync(buildDir, { recursive: true, force: true });
  await esbuild.build({
    entryPoints: [...tsFiles("src"), ...tsFiles("bench")],
    outdir: buildDir,
    outbase: repoRoot,
    format: "esm",
    platform: "node",
    target: "node20",
    bundle: false,
    logLevel: "error",
  });
  // Files src/ reads beside its modules (resolved from import.meta.url).
  mkdirSync(path.join(buildDir, "src", "providers"), { recursive: true });
  copyFileSync(path.join(repoRoot, "src", "providers", "catalogue.json"), path.join(buildDir, "src", "providers", "catalogue.json"));
  return true;
}
