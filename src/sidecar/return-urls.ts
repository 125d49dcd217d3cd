/**
 * The return-URL allow-list: where the sidecar may send a browser back to.
 * Without it, a ticket (or a crafted link) could bounce users to any site
 * (an open redirect). Each entry is an absolute http(s) URL; a return URL is
 * allowed when it has the same origin and its path is the entry's path or
 * below it (on a "/" boundary).
 */

/** Decides whether a return URL is allowed. */
export interface ReturnUrlPolicy {
  /** The parsed URL when allowed, else undefined. */
  check(returnUrl: string): URL | undefined;
  /** The entries, as configured. */
  readonly entries: readonly string[];
}

/** Builds the policy; throws an Error naming the bad entry. */
export function returnUrlPolicy(entries: readonly string[]): ReturnUrlPolicy {
  const parsed = entries.map((entry) => {
    const url = parseHttpUrl(entry);
    if (url === undefined) throw new Error(`"${entry}" is not an absolute http(s) URL without user name, query or fragment`);
    if (url.search !== "" || url.hash !== "") throw new Error(`"${entry}" must not have a query or fragment`);
    return { origin: url.origin, path: url.pathname.endsWith("/") ? url.pathname : `${url.pathname}/` };
  });
  return {
    entries,
    check(returnUrl) {
      const url = parseHttpUrl(returnUrl);
      if (url === undefined) return undefined;
      const path = url.pathname.endsWith("/") ? url.pathname : `${url.pathname}/`;
      return parsed.some((e) => e.origin === url.origin && path.startsWith(e.path)) ? url : undefined;
    },
  };
}

function parseHttpUrl(value: string): URL | undefined {
  // Backslashes and control characters are read differently by browsers and parsers: refuse them.
  if (/[\\\u0000-\u001f\u007f\s]/.test(value)) return undefined;
  let url: URL;
  try {
    url = new URL(value);
  } catch {
    return undefined;
  }
  if (url.protocol !== "https:" && url.protocol !== "http:") return undefined;
  if (url.username !== "" || url.password !== "") return undefined;
  // Dot segments and encoded slashes could climb out of an allowed path once decoded.
  if (/%2f|%5c|%2e/i.test(url.pathname)) return undefined;
  return url;
}
