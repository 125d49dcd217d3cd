/**
 * The sidecar's return-URL allow-list (src/sidecar/return-urls.ts): where a
 * browser may be sent back to after a connect. An entry allows its own origin
 * (scheme, host and port) and its path or anything below it on a "/"
 * boundary; everything that parsers and browsers could read differently
 * (user info, backslashes, encoded slashes, dot segments, control characters)
 * is refused, and so is every scheme but http(s).
 */
import { describe, expect, it } from "vitest";
import { returnUrlPolicy } from "../../src/sidecar/return-urls.js";

const policy = returnUrlPolicy(["https://app.example.com/settings", "http://localhost:3000/cb/", "https://root.example.com"]);

const allowed = (url: string) => policy.check(url) !== undefined;

describe("return URL allow-list: what is allowed", () => {
  it.each([
    ["the entry itself", "https://app.example.com/settings"],
    ["the entry with a trailing slash", "https://app.example.com/settings/"],
    ["a path below the entry", "https://app.example.com/settings/x"],
    ["a deeper path below the entry", "https://app.example.com/settings/integrations/gmail"],
    ["a query string (kept)", "https://app.example.com/settings?tab=mail&x=1"],
    ["a query string on a path below", "https://app.example.com/settings/x?tab=mail"],
    ["a fragment", "https://app.example.com/settings#mail"],
    ["the default port spelled out (same origin)", "https://app.example.com:443/settings"],
    ["an upper-case scheme and host (same origin once parsed)", "HTTPS://APP.EXAMPLE.COM/settings"],
    ["an entry with a trailing slash, without it", "http://localhost:3000/cb"],
    ["an entry with a trailing slash, below it", "http://localhost:3000/cb/done"],
    ["a root entry: any path of its origin", "https://root.example.com/anything/at/all"],
    ["a root entry: the origin alone", "https://root.example.com"],
  ])("%s: %s", (_what, url) => {
    expect(allowed(url)).toBe(true);
  });

  it("returns the parsed URL, query kept", () => {
    const url = policy.check("https://app.example.com/settings/x?tab=mail");
    expect(url).toBeInstanceOf(URL);
    expect(url!.href).toBe("https://app.example.com/settings/x?tab=mail");
  });

  // Dot segments, plain or percent-encoded, are resolved by the URL parser as
  // browsers resolve them; the check is made on the resolved path and the
  // URL handed back (the one the sidecar redirects to) is the resolved one, so
  // what was checked is where the browser goes. Climbing out is refused above.
  it.each([
    ["https://app.example.com/settings/x/../y", "https://app.example.com/settings/y"],
    ["https://app.example.com/settings/./y", "https://app.example.com/settings/y"],
    ["https://app.example.com/settings/x/%2e%2e/y", "https://app.example.com/settings/y"],
    ["https://app.example.com/settings/%2e", "https://app.example.com/settings/"],
    ["https:app.example.com/settings", "https://app.example.com/settings"],
  ])("resolves %j to %j before checking it, and returns the resolved URL", (url, resolved) => {
    expect(policy.check(url)?.href).toBe(resolved);
  });

  it("keeps the entries as configured", () => {
    expect(policy.entries).toEqual(["https://app.example.com/settings", "http://localhost:3000/cb/", "https://root.example.com"]);
  });
});

describe("return URL allow-list: what is refused", () => {
  it.each([
    // prefix on a "/" boundary only
    ["a sibling sharing the prefix", "https://app.example.com/settings-evil"],
    ["a sibling sharing the prefix, below", "https://app.example.com/settings-evil/x"],
    ["a longer segment", "https://app.example.com/settingsx"],
    ["a parent of the entry", "https://app.example.com/"],
    ["another path", "https://app.example.com/admin"],
    ["another case in the path", "https://app.example.com/Settings"],
    // origin
    ["another host", "https://evil.example.com/settings"],
    ["a subdomain", "https://evil.app.example.com/settings"],
    ["a host that ends like the allowed one", "https://app.example.com.evil.com/settings"],
    ["another port", "https://app.example.com:8443/settings"],
    ["another scheme (http for an https entry)", "http://app.example.com/settings"],
    ["another scheme (https for an http entry)", "https://localhost:3000/cb"],
    ["another port on localhost", "http://localhost:3001/cb"],
    ["127.0.0.1 for localhost", "http://127.0.0.1:3000/cb"],
    // user info
    ["a user name", "https://user@app.example.com/settings"],
    ["a user name and password", "https://user:pass@app.example.com/settings"],
    ["an empty password", "https://user:@app.example.com/settings"],
    ["the allowed host as user info of another", "https://app.example.com@evil.com/settings"],
    ["the allowed host and path as user info of another", "https://app.example.com/settings@evil.com"],
    // backslashes and encodings
    ["a backslash in the path", "https://app.example.com/settings\\..\\admin"],
    ["a backslash as a path separator", "https://app.example.com\\settings"],
    ["a backslash before the host", "https:\\\\evil.com/settings"],
    ["a backslash after the host", "https://evil.com\\@app.example.com/settings"],
    ["an encoded slash", "https://app.example.com/settings%2f..%2fadmin"],
    ["an encoded slash (upper case)", "https://app.example.com/settings%2F..%2Fadmin"],
    ["an encoded backslash", "https://app.example.com/settings/%5c..%5cadmin"],
    ["an encoded dot segment", "https://app.example.com/settings/%2e%2e/admin"],
    ["an encoded dot segment (upper case)", "https://app.example.com/settings/%2E%2E/admin"],
    ["a half-encoded dot segment", "https://app.example.com/settings/.%2e/admin"],
    ["a dot segment (encoded) climbing out to the parent", "https://app.example.com/settings/%2e%2e"],
    ["a dot segment climbing out to the parent", "https://app.example.com/settings/.."],
    ["a double-encoded dot segment climbing out", "https://app.example.com/settings/..%2f..%2fadmin"],
    ["a dot segment climbing out", "https://app.example.com/settings/../admin"],
    ["a dot segment climbing out, twice", "https://app.example.com/settings/x/../../admin"],
    // control characters and whitespace
    ["a tab in the path", "https://app.example.com/set\ttings"],
    ["a newline in the path", "https://app.example.com/settings\n/x"],
    ["a carriage return", "https://app.example.com/settings\r"],
    ["a NUL", "https://app.example.com/settings\u0000"],
    ["a space", "https://app.example.com/settings /x"],
    ["leading whitespace", " https://app.example.com/settings"],
    ["DEL", "https://app.example.com/settings\u007f"],
    // schemes
    ["javascript:", "javascript:alert(document.cookie)"],
    ["javascript: that names the allowed URL", "javascript://app.example.com/settings%0aalert(1)"],
    ["JavaScript: in mixed case", "JaVaScRiPt:alert(1)"],
    ["data:", "data:text/html,<script>alert(1)</script>"],
    ["vbscript:", "vbscript:msgbox(1)"],
    ["file:", "file:///etc/passwd"],
    ["ftp:", "ftp://app.example.com/settings"],
    ["a ws: URL", "ws://app.example.com/settings"],
    // not absolute
    ["a protocol-relative URL", "//app.example.com/settings"],
    ["a relative path", "/settings"],
    ["an empty string", ""],
    ["garbage", "not a url"],
  ])("%s: %j", (_what, url) => {
    expect(allowed(url)).toBe(false);
  });
});

describe("return URL allow-list: entries", () => {
  it.each([
    ["a relative entry", "/settings"],
    ["a javascript: entry", "javascript:alert(1)"],
    ["an entry with a query", "https://app.example.com/settings?x=1"],
    ["an entry with a fragment", "https://app.example.com/settings#x"],
    ["an entry with a user name", "https://user@app.example.com/settings"],
    ["an entry with a backslash", "https://app.example.com\\settings"],
    ["an entry that is not a URL", "app.example.com/settings"],
  ])("refuses %s", (_what, entry) => {
    expect(() => returnUrlPolicy([entry])).toThrow(/not an absolute http\(s\) URL|must not have a query or fragment/);
  });

  it("allows nothing without entries", () => {
    const empty = returnUrlPolicy([]);
    expect(empty.check("https://app.example.com/settings")).toBeUndefined();
  });

  it("an entry allows only its own origin even when another entry shares the path", () => {
    const two = returnUrlPolicy(["https://a.example.com/x", "https://b.example.com/y"]);
    expect(two.check("https://a.example.com/x/1")).toBeDefined();
    expect(two.check("https://b.example.com/y/1")).toBeDefined();
    expect(two.check("https://a.example.com/y")).toBeUndefined();
    expect(two.check("https://b.example.com/x")).toBeUndefined();
  });
});
