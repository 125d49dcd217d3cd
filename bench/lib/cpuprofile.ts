/**
 * Summarises a V8 .cpuprofile (node --cpu-prof): self time per function, and
 * total (inclusive) time per function and per area (src/, pg, Connect,
 * protobuf, pino, node internals ...).
 */
import { readFileSync } from "node:fs";

interface ProfileNode {
  id: number;
  callFrame: { functionName: string; url: string; lineNumber: number };
  hitCount?: number;
  children?: number[];
}

interface Profile {
  nodes: ProfileNode[];
  startTime: number;
  endTime: number;
  samples?: number[];
  timeDeltas?: number[];
}

/** A line of the summary. */
export interface ProfileEntry {
  name: string;
  ms: number;
  share: number;
}

/** The area a script URL belongs to. */
export function areaOf(rawUrl: string): string {
  const url = rawUrl.replace("/bench/.build/", "/");
  if (url === "") return "(native/gc/idle)";
  const nm = /node_modules\/((?:@[^/]+\/)?[^/]+)/.exec(url);
  if (nm !== null) return nm[1]!;
  const src = /\/(src|bench)\/(.*)$/.exec(url);
  if (src !== null) return `${src[1]}/${src[2]!.split("/").slice(0, -1).join("/") || "."}`;
  if (url.startsWith("node:")) return url.split("/").slice(0, 2).join("/");
  return url;
}

function label(n: ProfileNode): string {
  const f = n.callFrame;
  const where = f.url === "" ? "" : ` ${f.url.replace("/bench/.build/", "/").replace(/^.*?\/(src|bench|node_modules)\//, "$1/")}:${f.lineNumber + 1}`;
  return `${f.functionName || "(anonymous)"}${where}`;
}

/** Reads and summarises a profile; `top` entries per list. */
export function summariseProfile(file: string, top = 25) {
  const profile = JSON.parse(readFileSync(file, "utf8")) as Profile;
  const byId = new Map(profile.nodes.map((n) => [n.id, n]));
  // Time per sample from timeDeltas when present, else an even split.
  const selfUs = new Map<number, number>();
  if (profile.samples !== undefined && profile.timeDeltas !== undefined) {
    for (let i = 0; i < profile.samples.length; i++) {
      const id = profile.samples[i]!;
      selfUs.set(id, (selfUs.get(id) ?? 0) + (profile.timeDeltas[i + 1] ?? profile.timeDeltas[i] ?? 0));
    }
  } else {
    const totalHits = profile.nodes.reduce((a, n) => a + (n.hitCount ?? 0), 0);
    const per = (profile.endTime - profile.startTime) / Math.max(1, totalHits);
    for (const n of profile.nodes) selfUs.set(n.id, (n.hitCount ?? 0) * per);
  }
  const totalUs = [...selfUs.values()].reduce((a, b) => a + b, 0);
  const idleUs = profile.nodes.filter((n) => n.callFrame.functionName === "(idle)").reduce((a, n) => a + (selfUs.get(n.id) ?? 0), 0);
  const busyUs = totalUs - idleUs;

  const parent = new Map<number, number>();
  for (const n of profile.nodes) for (const c of n.children ?? []) parent.set(c, n.id);

  const self = new Map<string, number>();
  const inclusive = new Map<string, number>();
  const areaSelf = new Map<string, number>();
  for (const n of profile.nodes) {
    const us = selfUs.get(n.id) ?? 0;
    if (us === 0 || n.callFrame.functionName === "(idle)") continue;
    const name = label(n);
    self.set(name, (self.get(name) ?? 0) + us);
    // Native frames have no script: name them (GC, writev, ...) rather than lump them.
    const area = n.callFrame.url === "" ? `native: ${n.callFrame.functionName || "(anonymous)"}` : areaOf(n.callFrame.url);
    areaSelf.set(area, (areaSelf.get(area) ?? 0) + us);
    // Inclusive: credit every distinct function on the stack once.
    const seen = new Set<string>();
    for (let id: number | undefined = n.id; id !== undefined; id = parent.get(id)) {
      const node = byId.get(id)!;
      const l = label(node);
      if (seen.has(l)) continue;
      seen.add(l);
      inclusive.set(l, (inclusive.get(l) ?? 0) + us);
    }
  }
  const list = (m: Map<string, number>, n: number): ProfileEntry[] =>
    [...m.entries()]
      .sort((a, b) => b[1] - a[1])
      .slice(0, n)
      .map(([name, us]) => ({ name, ms: Math.round(us / 100) / 10, share: Math.round((us / busyUs) * 1000) / 10 }));
  return {
    wallMs: Math.round((profile.endTime - profile.startTime) / 1000),
    busyMs: Math.round(busyUs / 1000),
    self: list(self, top),
    inclusive: list(
      new Map([...inclusive.entries()].filter(([name]) => !name.startsWith("(root)") && !name.startsWith("(program)"))),
      top,
    ),
    areas: list(areaSelf, 30),
  };
}
