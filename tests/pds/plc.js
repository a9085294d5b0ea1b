// A PLC directory stand-in on 127.0.0.1 (port 0): stores each DID's last signed operation
// (POST /:did) and serves its DID document (GET /:did), its data (/:did/data) and its last
// operation (/:did/log/last). No signature checks: the tests trust the PDS they started.
const http = require('http');
const ops = new Map();
const doc = (did, op) => ({
  '@context': ['https://www.w3.org/ns/did/v1', 'https://w3id.org/security/multikey/v1'],
  id: did,
  alsoKnownAs: op.alsoKnownAs || [],
  verificationMethod: Object.entries(op.verificationMethods || {}).map(([k, v]) => ({
    id: `${did}#${k}`, type: 'Multikey', controller: did, publicKeyMultibase: v.replace(/^did:key:/, ''),
  })),
  service: Object.entries(op.services || {}).map(([k, v]) => ({ id: `#${k}`, type: v.type, serviceEndpoint: v.endpoint })),
});
const server = http.createServer((req, res) => {
  const parts = decodeURIComponent(req.url.split('?')[0]).split('/').filter(Boolean);
  const did = parts[0];
  const send = (code, body) => { res.writeHead(code, { 'content-type': 'application/json' }); res.end(JSON.stringify(body)); };
  if (req.method === 'POST' && did) {
    let body = '';
    req.on('data', (c) => (body += c));
    req.on('end', () => { ops.set(did, JSON.parse(body)); send(200, {}); });
    return;
  }
  const op = ops.get(did);
  if (!op) return send(404, { message: `DID not registered: ${did}` });
  if (parts.length === 1) return send(200, doc(did, op));
  if (parts[1] === 'data') return send(200, { did, verificationMethods: op.verificationMethods, rotationKeys: op.rotationKeys, alsoKnownAs: op.alsoKnownAs, services: op.services });
  if (parts[1] === 'log' && parts[2] === 'last') return send(200, op);
  if (parts[1] === 'log' && parts[2] === 'audit') return send(200, [{ did, operation: op, cid: 'x', nullified: false, createdAt: new Date().toISOString() }]);
  send(404, { message: 'not found' });
});
server.listen(0, '127.0.0.1', () => console.log(`PLC ${server.address().port}`));
