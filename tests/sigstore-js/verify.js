// The independent cross-check: sigstore-js's own verifier (@sigstore/verify) judges a bundle
// of an image digest against a trusted root and an identity, the way bootsync's policy does.
// sigstore-js checks the signature, the certificate chain at the signing time, the SCT, the
// tlog entry and the identity; the subject of an in-toto statement (the image digest) and its
// predicate type are checked here, as cosign does for an image signature.
//
// usage: node verify.js BUNDLE TRUSTED_ROOT DIGEST ISSUER SUBJECT_REGEXP [ARTIFACT]
// prints {"ok": true} or {"ok": false, "error": "..."}; exits 0 either way.
'use strict';
const fs = require('fs');
const { bundleFromJSON } = require('@sigstore/bundle');
const { TrustedRoot } = require('@sigstore/protobuf-specs');
const { Verifier, toSignedEntity, toTrustMaterial } = require('@sigstore/verify');

const SIGN_PREDICATE = 'https://sigstore.dev/cosign/sign/v1';

function check([bundlePath, rootPath, digest, issuer, subject, artifactPath]) {
  const bundle = bundleFromJSON(JSON.parse(fs.readFileSync(bundlePath, 'utf8')));
  const root = TrustedRoot.fromJSON(JSON.parse(fs.readFileSync(rootPath, 'utf8')));
  const hex = digest.replace(/^sha256:/, '');
  if (bundle.content.$case === 'dsseEnvelope') {
    const statement = JSON.parse(Buffer.from(bundle.content.dsseEnvelope.payload).toString('utf8'));
    const names = (statement.subject || []).some((s) => s.digest && s.digest.sha256 === hex);
    if (!names) throw new Error(`the statement's subject is not ${digest}`);
    if (statement.predicateType !== SIGN_PREDICATE) throw new Error(`predicate ${statement.predicateType}`);
  } else {
    const md = bundle.content.messageSignature.messageDigest;
    if (Buffer.from(md.digest).toString('hex') !== hex) throw new Error(`the message digest is not ${digest}`);
  }
  const artifact = artifactPath ? fs.readFileSync(artifactPath) : undefined;
  const verifier = new Verifier(toTrustMaterial(root), { tlogThreshold: 1, ctlogThreshold: 1 });
  verifier.verify(toSignedEntity(bundle, artifact), {
    subjectAlternativeName: new RegExp(subject),
    extensions: { issuer },
  });
}

try {
  check(process.argv.slice(2));
  process.stdout.write(JSON.stringify({ ok: true }) + '\n');
} catch (e) {
  process.stdout.write(JSON.stringify({ ok: false, error: String(e && e.message ? e.message : e) }) + '\n');
}
