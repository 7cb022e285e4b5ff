// The node source's work: parse the package database into objects in a Map,
// index every word of the descriptions and of man pages (argv budget of text),
// keep a JSON copy of the package objects; say `ready`; hold it all until stdin ends.
const fs = require('fs'), zlib = require('zlib'), path = require('path');
const pkgs = new Map(), index = new Map();
const words = (text, key) => {
  for (const w of text.split(/\s+/)) {
    if (!w) continue;
    let s = index.get(w);
    if (!s) index.set(w, s = []);
    s.push(key);
  }
};
for (const stanza of fs.readFileSync('/var/lib/dpkg/status', 'latin1').split('\n\n')) {
  const rec = {};
  let field = null;
  for (const line of stanza.split('\n')) {
    if ((line[0] === ' ' || line[0] === '\t') && field) { rec[field] += '\n' + line; continue; }
    const i = line.indexOf(':');
    if (i > 0) { field = line.slice(0, i); rec[field] = line.slice(i + 1).trim(); }
  }
  if (rec.Package) { pkgs.set(rec.Package, rec); words(rec.Description || '', rec.Package); }
}
const man = new Map(), budget = Number(process.argv[2]);
let used = 0;
for (const sec of fs.readdirSync('/usr/share/man').filter(s => /^man\d/.test(s)).sort()) {
  for (const f of fs.readdirSync(path.join('/usr/share/man', sec)).sort()) {
    if (used >= budget || !f.endsWith('.gz')) continue;
    try {
      const t = zlib.gunzipSync(fs.readFileSync(path.join('/usr/share/man', sec, f))).toString();
      used += t.length;
      man.set(sec + '/' + f, t);
      words(t, f);
    } catch (e) { /* a broken page: skip it */ }
  }
}
const json = JSON.stringify([...pkgs.values()]);
process.stdout.write('ready\n');
process.stdin.on('data', () => {});
process.stdin.on('end', () => {
  if (json.length < 0) console.log(man.size, index.size);  // keeps all of it reachable
  process.exit(0);
});
