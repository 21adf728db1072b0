// Signs image digests the way cosign v3 does (a Sigstore bundle: a DSSE envelope holding an
// in-toto statement whose subject is the digest, predicate type https://sigstore.dev/cosign/sign/v1),
// or as a message signature, with sigstore-js against its own local Fulcio, Rekor and TSA
// (@sigstore/mock), and attaches the bundles to images with @sigstore/oci. Writes the trusted
// root that describes the mock services. Used by tests/signatures.rs; nobody here wrote the
// signing or the attaching.
//
// usage: node sign.js JOB.json   (see tests/signatures.rs for the fields)
'use strict';
const crypto = require('crypto');
const fs = require('fs');
const path = require('path');
const nock = require('nock');
const mock = require('@sigstore/mock');
const sign = require('@sigstore/sign');
const oci = require('@sigstore/oci');

const FULCIO = 'https://fulcio.mock.test';
const REKOR = 'https://rekor.mock.test';
const TSA = 'https://tsa.mock.test';
const SIGN_PREDICATE = 'https://sigstore.dev/cosign/sign/v1';
const BUNDLE_TYPE = 'application/vnd.dev.sigstore.bundle.v0.3+json';

function keyPair() {
  return crypto.generateKeyPairSync('ec', { namedCurve: 'P-256' });
}

function serve(base, handler) {
  nock(base)
    .persist()
    .post(handler.path)
    .reply(async (_uri, body) => {
      const req = typeof body === 'string' ? body : JSON.stringify(body);
      const { statusCode, response, contentType } = await handler.fn(req);
      return [statusCode, response, { 'Content-Type': contentType || 'text/plain' }];
    });
}

function spki(key) {
  return key.export({ format: 'der', type: 'spki' });
}

function b64(buf) {
  return Buffer.from(buf).toString('base64');
}

function jwt(claims) {
  const enc = (o) => Buffer.from(JSON.stringify(o)).toString('base64url');
  return `${enc({ alg: 'none', typ: 'JWT' })}.${enc(claims)}.sig`;
}

async function main() {
  const job = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
  const clock = job.ca_clock ? new Date(job.ca_clock) : undefined;
  const since = '2020-01-01T00:00:00Z';

  const ctKeys = keyPair();
  const ctlog = await mock.initializeCTLog(ctKeys);
  const ca = await mock.initializeCA(keyPair(), ctlog, clock);
  const tlogKeys = keyPair();
  const tlog = await mock.initializeTLog(REKOR, tlogKeys);
  // The mock TSA stamps milliseconds; sigstore-rust reads genTime with der's RFC 5280
  // GeneralizedTime, which has no fractions (https://github.com/RustCrypto/formats/issues/2061),
  // so it refuses such tokens. Sigstore's own TSA writes whole seconds: so does this one. Its
  // clock is set to the current whole second at each stamp (never before the signing
  // certificate's or its own certificate's notBefore, which are truncated to the second).
  const tsaClock = new Date();
  const tsa = await mock.initializeTSA(keyPair(), tsaClock);
  const stamp = tsa.timestamp.bind(tsa);
  tsa.timestamp = (req) => {
    tsaClock.setTime(Math.floor(Date.now() / 1000) * 1000);
    return stamp(req);
  };
  serve(FULCIO, mock.fulcioHandler(ca));
  serve(REKOR, mock.rekorHandler(tlog));
  serve(TSA, mock.tsaHandler(tsa));

  // The trusted root a Sigstore client would be given for these services.
  const sha256 = (b) => crypto.createHash('sha256').update(b).digest();
  const root = {
    mediaType: 'application/vnd.dev.sigstore.trustedroot+json;version=0.1',
    tlogs: [{
      baseUrl: REKOR,
      hashAlgorithm: 'SHA2_256',
      publicKey: { rawBytes: b64(spki(tlogKeys.publicKey)), keyDetails: 'PKIX_ECDSA_P256_SHA_256', validFor: { start: since } },
      logId: { keyId: b64(sha256(spki(tlogKeys.publicKey))) },
    }],
    certificateAuthorities: [{
      subject: { organization: 'sigstore.mock', commonName: 'sigstore' },
      uri: FULCIO,
      certChain: { certificates: [{ rawBytes: b64(ca.rootCertificate) }] },
      validFor: { start: since },
    }],
    ctlogs: [{
      baseUrl: 'https://ctfe.mock.test',
      hashAlgorithm: 'SHA2_256',
      publicKey: { rawBytes: b64(ctlog.publicKey), keyDetails: 'PKIX_ECDSA_P256_SHA_256', validFor: { start: since } },
      logId: { keyId: b64(ctlog.logID) },
    }],
    timestampAuthorities: [{
      subject: { organization: 'sigstore.mock', commonName: 'tsa' },
      uri: TSA,
      certChain: { certificates: [{ rawBytes: b64(tsa.intCertificate) }, { rawBytes: b64(tsa.rootCertificate) }] },
      validFor: { start: since },
    }],
  };
  fs.writeFileSync(path.join(job.out_dir, 'trusted_root.json'), JSON.stringify(root, null, 2));

  const claims = { sub: job.subject, iss: job.issuer, aud: 'sigstore' };
  const signer = new sign.FulcioSigner({
    fulcioBaseURL: FULCIO,
    identityProvider: { getToken: async () => jwt(claims) },
  });
  const witnesses = [new sign.RekorWitness({ rekorBaseURL: REKOR, entryType: job.entry_type })];
  if (job.tsa) witnesses.push(new sign.TSAWitness({ tsaBaseURL: TSA }));

  const written = [];
  for (const [i, s] of job.sign.entries()) {
    let bundle;
    if (s.message) {
      // A message signature over the bytes whose sha256 is the digest (the manifest).
      const builder = new sign.MessageSignatureBundleBuilder({ signer, witnesses });
      bundle = await builder.create({ data: Buffer.from(s.message, 'base64') });
    } else {
      const statement = {
        _type: 'https://in-toto.io/Statement/v1',
        subject: [{ name: s.name || 'image', digest: { sha256: s.digest.replace(/^sha256:/, '') } }],
        predicateType: s.predicate_type || SIGN_PREDICATE,
        predicate: {},
      };
      const builder = new sign.DSSEBundleBuilder({ signer, witnesses });
      bundle = await builder.create({
        data: Buffer.from(JSON.stringify(statement)),
        type: 'application/vnd.in-toto+json',
      });
    }
    const json = sign.bundleToJSON ? sign.bundleToJSON(bundle) : require('@sigstore/bundle').bundleToJSON(bundle);
    if (s.tamper) {
      const sig = json.dsseEnvelope ? json.dsseEnvelope.signatures[0] : json.messageSignature;
      const bytes = Buffer.from(sig.sig || sig.signature, 'base64');
      bytes[bytes.length - 5] ^= 0x01;
      if (sig.sig) sig.sig = b64(bytes); else sig.signature = b64(bytes);
    }
    const text = JSON.stringify(json);
    const file = path.join(job.out_dir, `bundle-${i}.json`);
    fs.writeFileSync(file, text);
    written.push(file);
    if (s.attach_to) {
      await oci.attachArtifactToImage({
        imageName: s.image,
        imageDigest: s.attach_to,
        artifact: Buffer.from(text),
        mediaType: BUNDLE_TYPE,
        annotations: {
          'dev.sigstore.bundle.content': json.dsseEnvelope ? 'dsse-envelope' : 'message-signature',
          'dev.sigstore.bundle.predicateType': SIGN_PREDICATE,
        },
        credentials: { username: '', password: '' },
      });
    }
  }
  process.stdout.write(JSON.stringify({ bundles: written }) + '\n');
}

main().catch((e) => {
  process.stderr.write(`sign.js: ${e.stack || e}\n`);
  for (let c = e.cause; c; c = c.cause) process.stderr.write(`caused by: ${c.stack || c}\n`);
  process.exit(1);
});
