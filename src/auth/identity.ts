/**
 * The identity a client certificate proves: its first SAN URI (such as a
 * SPIFFE id), else its first SAN DNS name, else its subject CN. Only
 * certificates that chain to the configured client CA get this far.
 */
import type { PeerCertificate } from "node:tls";

/** The identity of a verified client certificate, or undefined when it names none. */
export function certificateIdentity(cert: PeerCertificate | undefined): string | undefined {
  if (cert === undefined || Object.keys(cert).length === 0) return undefined;
  const names = (cert.subjectaltname ?? "").split(/,\s*/).filter((n) => n !== "");
  const uri = names.find((n) => n.startsWith("URI:"));
  if (uri !== undefined) return uri.slice(4);
  const dns = names.find((n) => n.startsWith("DNS:"));
  if (dns !== undefined) return dns.slice(4);
  const cn = cert.subject?.CN;
  return typeof cn === "string" && cn !== "" ? cn : Array.isArray(cn) ? cn[0] : undefined;
}
