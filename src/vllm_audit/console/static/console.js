// vllm-audit console: checks a record's inclusion proof in the browser (no dependencies).
//
// 1. the stored line (the bytes the log hashed) parses to exactly the fields the page shows;
// 2. leaf = SHA-256(0x00 || header || SHA-256(body)) of the stored line equals the proof's leaf hash
//    (the header ends right after the comma that follows "org_tag": vllm_audit/integrity/codec.py);
// 3. the RFC 6962 / RFC 9162 inclusion path from the leaf reaches the checkpoint's root;
// 4. the checkpoint is for this writer and covers the record (origin, tree size);
// 5. the checkpoint note's Ed25519 signature verifies with the trusted key (WebCrypto), or, where
//    the browser has no Ed25519, the page says "verified by the server only" for that step.
"use strict";

const enc = new TextEncoder();

function hex(bytes) {
  return Array.from(new Uint8Array(bytes), (b) => b.toString(16).padStart(2, "0")).join("");
}

function unhex(s) {
  if (!/^([0-9a-f]{2})*$/.test(s)) throw new Error("not hex");
  const out = new Uint8Array(s.length / 2);
  for (let i = 0; i < out.length; i++) out[i] = parseInt(s.slice(2 * i, 2 * i + 2), 16);
  return out;
}

function unb64(s) {
  const bin = atob(s);
  const out = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
  return out;
}

function concat(...parts) {
  const n = parts.reduce((a, p) => a + p.length, 0);
  const out = new Uint8Array(n);
  let o = 0;
  for (const p of parts) {
    out.set(p, o);
    o += p.length;
  }
  return out;
}

async function sha256(bytes) {
  return new Uint8Array(await crypto.subtle.digest("SHA-256", bytes));
}

const leafHash = (data) => sha256(concat(Uint8Array.of(0), data));
const TAG_KEY = enc.encode('"org_tag":"');

// The leaf of a stored line: the RFC 6962 leaf of its tlog entry, header || SHA-256(body).
async function lineLeaf(line) {
  let at = -1;
  search: for (let i = 0; i + TAG_KEY.length <= line.length; i++) {
    for (let j = 0; j < TAG_KEY.length; j++) if (line[i + j] !== TAG_KEY[j]) continue search;
    at = i;
    break;
  }
  const cut = at < 0 ? line.length : Math.min(at + TAG_KEY.length + 34, line.length);
  return leafHash(concat(line.slice(0, cut), await sha256(line.slice(cut))));
}
const nodeHash = (l, r) => sha256(concat(Uint8Array.of(1), l, r));

function same(a, b) {
  if (a.length !== b.length) return false;
  let d = 0;
  for (let i = 0; i < a.length; i++) d |= a[i] ^ b[i];
  return d === 0;
}

function deepEqual(a, b) {
  if (a === b) return true;
  if (typeof a !== typeof b || a === null || b === null || typeof a !== "object") return false;
  if (Array.isArray(a) !== Array.isArray(b)) return false;
  const ka = Object.keys(a);
  const kb = Object.keys(b);
  if (ka.length !== kb.length) return false;
  return ka.every((k) => Object.prototype.hasOwnProperty.call(b, k) && deepEqual(a[k], b[k]));
}

// RFC 9162 section 2.1.3.2: the root implied by an inclusion proof.
async function rootFromProof(index, size, leaf, path) {
  if (!(index >= 0 && index < size)) throw new Error(`leaf index ${index} is not in a tree of size ${size}`);
  let fn = index;
  let sn = size - 1;
  let r = leaf;
  for (const p of path) {
    if (sn === 0) throw new Error("inclusion proof is too long");
    if (fn % 2 === 1 || fn === sn) {
      r = await nodeHash(p, r);
      if (fn % 2 === 0) {
        while (fn !== 0 && fn % 2 === 0) {
          fn = Math.floor(fn / 2);
          sn = Math.floor(sn / 2);
        }
      }
    } else {
      r = await nodeHash(r, p);
    }
    fn = Math.floor(fn / 2);
    sn = Math.floor(sn / 2);
  }
  if (sn !== 0) throw new Error("inclusion proof is too short");
  return r;
}

function parseNote(note) {
  const cut = note.lastIndexOf("\n\n");
  if (!note.endsWith("\n") || cut < 0) throw new Error("the checkpoint note is malformed");
  const text = note.slice(0, cut + 1);
  const sigs = note
    .slice(cut + 2)
    .split("\n")
    .filter((l) => l)
    .map((line) => {
      const parts = line.split(" ");
      if (parts.length !== 3 || parts[0] !== "\u2014") throw new Error("malformed signature line");
      const raw = unb64(parts[2]);
      return { name: parts[1], keyId: raw.slice(0, 4), sig: raw.slice(4) };
    });
  const lines = text.split("\n");
  if (lines.length < 4) throw new Error("checkpoint body needs an origin, a size and a root hash");
  return { text, sigs, origin: lines[0], size: Number(lines[1]), root: unb64(lines[2]) };
}

async function parseVkey(vkey) {
  const a = vkey.indexOf("+");
  const b = vkey.indexOf("+", a + 1);
  const name = vkey.slice(0, a);
  const raw = unb64(vkey.slice(b + 1));
  if (raw[0] !== 1 || raw.length !== 33) throw new Error("not an Ed25519 key");
  const pub = raw.slice(1);
  const id = (await sha256(concat(enc.encode(name + "\n"), Uint8Array.of(1), pub))).slice(0, 4);
  return { name, pub, id };
}

// -> "ok" | "fail:<why>" | "unsupported"
async function checkSignature(cp, vkeys) {
  const keys = [];
  for (const v of vkeys) keys.push(await parseVkey(v));
  let signedByKnown = false;
  for (const s of cp.sigs) {
    for (const k of keys) {
      if (k.name !== s.name || !same(k.id, s.keyId)) continue;
      signedByKnown = true;
      let key;
      try {
        key = await crypto.subtle.importKey("raw", k.pub, { name: "Ed25519" }, false, ["verify"]);
      } catch (e) {
        return "unsupported";
      }
      const ok = await crypto.subtle.verify({ name: "Ed25519" }, key, s.sig, enc.encode(cp.text));
      if (!ok) return "fail:the signature does not verify (the checkpoint was altered)";
    }
  }
  return signedByKnown ? "ok" : "fail:the checkpoint is not signed by a trusted key";
}

function step(list, label, result, detail) {
  const li = document.createElement("li");
  li.className = `step ${result}`;
  li.dataset.result = result;
  const mark = result === "ok" ? "\u2713" : result === "server-only" ? "\u2012" : "\u2717";
  li.textContent = `${mark} ${label}${detail ? ": " + detail : ""}`;
  list.appendChild(li);
  return result;
}

async function checkProof(data) {
  const L = data.labels;
  const status = document.getElementById("proof-status");
  const list = document.getElementById("proof-steps");
  const p = data.proof;
  const results = [];
  const finish = () => {
    const failed = results.includes("fail");
    const serverOnly = results.includes("server-only");
    const verdict = failed ? "failed" : serverOnly ? "server-only" : "verified";
    status.dataset.result = verdict;
    status.className = `proof-${verdict}`;
    status.textContent = failed ? L["proof.fail"] : serverOnly ? L["proof.server_only"] : L["proof.ok"];
  };
  if (!globalThis.crypto || !crypto.subtle) {
    results.push(step(list, L["proof.step.leaf"], "server-only", data.server));
    finish();
    return;
  }
  try {
    const line = enc.encode(p.record);
    let stored;
    try {
      stored = JSON.parse(p.record);
    } catch (e) {
      stored = null;
    }
    const head = `{"seq":${p.leaf_index},"prev":"`;
    const headerOk = p.record.startsWith(head) && p.record.slice(head.length, head.length + 96).includes(`"writer_id":${JSON.stringify(p.writer_id)},`);
    results.push(step(list, L["proof.step.record"], stored !== null && headerOk && deepEqual(stored, data.record) ? "ok" : "fail"));
    const leaf = await lineLeaf(line);
    results.push(step(list, L["proof.step.leaf"], hex(leaf) === p.leaf_hash ? "ok" : "fail", hex(leaf).slice(0, 16) + "\u2026"));
    const cp = parseNote(p.checkpoint);
    const sizeOk = cp.origin.endsWith("/" + p.writer_id) && cp.size === p.tree_size && p.leaf_index < cp.size;
    results.push(step(list, L["proof.step.size"], sizeOk ? "ok" : "fail", `${cp.origin} ${cp.size}`));
    let rootOk = false;
    let why = "";
    try {
      const root = await rootFromProof(p.leaf_index, p.tree_size, leaf, p.inclusion_proof.map(unhex));
      rootOk = same(root, cp.root);
      why = hex(root).slice(0, 16) + "\u2026";
    } catch (e) {
      why = String(e.message || e);
    }
    results.push(step(list, L["proof.step.root"], rootOk ? "ok" : "fail", why));
    const sig = await checkSignature(cp, data.keys);
    if (sig === "ok") results.push(step(list, L["proof.step.sig"], "ok"));
    else if (sig === "unsupported") results.push(step(list, L["proof.step.sig"], "server-only", data.server));
    else results.push(step(list, L["proof.step.sig"], "fail", sig.slice(5)));
  } catch (e) {
    results.push(step(list, "error", "fail", String(e.message || e)));
  }
  finish();
}

function main() {
  const el = document.getElementById("proof-data");
  if (el) checkProof(JSON.parse(el.textContent));
}

if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", main);
else main();
