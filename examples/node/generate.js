#!/usr/bin/env node
// A Node.js gRPC client of the AccelGen gateway, written only from the .proto files.
//
// It loads protos/accelgen/v1/gateway.proto (and the common.proto it imports) at run time with
// @grpc/proto-loader, so nothing is generated. Three examples, as in examples/python/generate.py:
//   stream  a streaming Generate with an application class (its default SLO) or an explicit SLO,
//           printing each chunk's tokens as they arrive and the final GenerateComplete;
//   cancel  a stream cancelled after a few tokens with the Cancel RPC; the stream then ends with
//           finish_reason "abort";
//   error   requests the gateway refuses, and how to read the status code, the message and the
//           retry-after-ms trailer of a RESOURCE_EXHAUSTED answer.
// API key: `authorization: Bearer KEY` metadata (--api-key or $ACCELGEN_API_KEY).
// TLS: --tls (system roots) or --ca-cert FILE.
//
//   npm ci --prefix examples/node
//   node examples/node/generate.js --address 127.0.0.1:50050 --mode all
'use strict';

const fs = require('fs');
const path = require('path');
const { parseArgs } = require('util');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_ROOT = path.resolve(__dirname, '..', '..', 'protos');

function loadGateway() {
  const definition = protoLoader.loadSync('accelgen/v1/gateway.proto', {
    includeDirs: [PROTO_ROOT],
    keepCase: true, // field names as in the .proto: app_class, max_new_tokens
    longs: Number,
    defaults: true,
    oneofs: true, // a response says which of chunk/complete it holds in `response`
  });
  return grpc.loadPackageDefinition(definition).accelgen.v1;
}

function options() {
  const { values } = parseArgs({
    options: {
      address: { type: 'string', default: '127.0.0.1:50050' },
      mode: { type: 'string', default: 'all' },
      'api-key': { type: 'string', default: process.env.ACCELGEN_API_KEY || '' },
      tls: { type: 'boolean', default: false },
      'ca-cert': { type: 'string', default: '' },
      prompt: { type: 'string', default: 'The quick brown fox' },
      'app-class': { type: 'string', default: 'chat' },
      temperature: { type: 'string', default: '0' }, // 0 = greedy; n > 1 needs > 0
      'ttft-ms': { type: 'string', default: '0' },
      'tbt-ms': { type: 'string', default: '0' },
      'max-tokens': { type: 'string', default: '16' },
      'long-tokens': { type: 'string', default: '2000' },
      'cancel-after': { type: 'string', default: '3' },
      stop: { type: 'string', multiple: true, default: [] },
      n: { type: 'string', default: '1' },
      timeout: { type: 'string', default: '60' },
    },
  });
  if (!['stream', 'cancel', 'error', 'all'].includes(values.mode)) {
    throw new Error(`--mode must be stream, cancel, error or all, not ${values.mode}`);
  }
  return values;
}

function credentials(opts) {
  if (opts.tls || opts['ca-cert']) {
    const root = opts['ca-cert'] ? fs.readFileSync(opts['ca-cert']) : null;
    return grpc.credentials.createSsl(root);
  }
  return grpc.credentials.createInsecure();
}

// The API key, as the gateway reads it: `authorization: Bearer KEY`.
function metadata(opts) {
  const md = new grpc.Metadata();
  if (opts['api-key']) md.set('authorization', `Bearer ${opts['api-key']}`);
  return md;
}

function deadline(opts) {
  return new Date(Date.now() + 1000 * Number(opts.timeout));
}

// A streamed text request; an explicit SLO (--ttft-ms / --tbt-ms) overrides the class's default.
function makeRequest(opts, maxTokens, label, newerFields = true) {
  const req = {
    request_id: label, // the client's own label; the gateway makes the request id
    text: opts.prompt,
    sampling_params: { max_new_tokens: maxTokens, temperature: Number(opts.temperature) },
    app_class: opts['app-class'],
    stream: true,
  };
  const ttft = Number(opts['ttft-ms']);
  const tbt = Number(opts['tbt-ms']);
  if (ttft || tbt) req.slo = { ttft_ms: ttft, tbt_ms: tbt };
  // stop strings and n completions exist in newer gateway.proto files (sent only when asked for:
  // proto-loader drops fields the .proto does not know).
  if (newerFields && opts.stop.length) req.stop = opts.stop;
  if (newerFields && Number(opts.n) > 1) req.n = Number(opts.n);
  return req;
}

// `CODE: message`, plus the retry hint a RESOURCE_EXHAUSTED answer carries.
function describeError(err) {
  const name = Object.keys(grpc.status).find((k) => grpc.status[k] === err.code) || String(err.code);
  let text = `${name}: ${err.details}`;
  const retry = err.metadata && err.metadata.get('retry-after-ms');
  if (retry && retry.length) text += ` (retry after ${retry[0]} ms)`;
  return text;
}

// Print tokens as they come; onTokens(requestId, seen) may cancel. Resolves with the completes
// (one per sample: with n > 1, `many`, the samples' chunks interleave, each tagged with its index).
function printStream(call, onTokens, many = false) {
  const tag = (message) => (many ? `[${message.index || 0}] ` : '');
  return new Promise((resolve, reject) => {
    const announced = new Set(); // one request id per sample
    const completes = [];
    let seen = 0;
    call.on('data', (resp) => {
      if (!announced.has(resp.request_id)) {
        console.log(`request_id: ${resp.request_id}`);
        announced.add(resp.request_id);
      }
      if (resp.response === 'chunk') {
        const chunk = resp.chunk;
        seen += chunk.token_ids.length;
        console.log(`tokens: ${tag(chunk)}[${chunk.token_ids.join(', ')}] text=${JSON.stringify(chunk.text)} ` +
                    `(completion_tokens=${chunk.completion_tokens})`);
        if (onTokens) onTokens(resp.request_id, seen);
      } else if (resp.response === 'complete') {
        const complete = resp.complete;
        completes.push(complete);
        // stop_reason: the stop string or stop token id that ended a "stop" finish (newer protos).
        const why = complete.stop_reason ? ` stop_reason=${JSON.stringify(complete[complete.stop_reason])}` : '';
        console.log(`complete: ${tag(complete)}finish_reason=${complete.finish_reason} ` +
                    `completion_tokens=${complete.completion_tokens} prompt_tokens=${complete.prompt_tokens} ` +
                    `ttft_ms=${complete.ttft_ms.toFixed(1)} mean_tbt_ms=${complete.mean_tbt_ms.toFixed(1)} ` +
                    `slo_met=${complete.slo_met}${why}`);
        console.log(`text: ${tag(complete)}${JSON.stringify(complete.text)}`);
      }
    });
    call.on('error', reject);
    call.on('end', () => resolve(completes));
  });
}

function unary(client, method, request, opts) {
  return new Promise((resolve, reject) => {
    client[method](request, metadata(opts), { deadline: deadline(opts) },
                   (err, reply) => (err ? reject(err) : resolve(reply)));
  });
}

async function runStream(client, opts) {
  const slo = Number(opts['ttft-ms']) || Number(opts['tbt-ms'])
    ? `SLO ttft=${opts['ttft-ms']} ms tbt=${opts['tbt-ms']} ms` : "its class's SLO";
  const many = Number(opts.n) > 1;
  const extra = (opts.stop.length ? `, stop=${JSON.stringify(opts.stop)}` : '') + (many ? `, n=${opts.n}` : '');
  console.log(`== stream: app_class=${JSON.stringify(opts['app-class'])} with ${slo}${extra}`);
  const call = client.Generate(makeRequest(opts, Number(opts['max-tokens']), 'example-stream'), metadata(opts),
                               { deadline: deadline(opts) });
  await printStream(call, null, many);
}

// Cancel after --cancel-after tokens: the stream goes on to a GenerateComplete with "abort".
// (call.cancel() -- leaving the stream -- cancels the request too, with status CANCELLED here.)
async function runCancel(client, opts) {
  const after = Number(opts['cancel-after']);
  console.log(`== cancel: after ${after} tokens of a ${opts['long-tokens']}-token request`);
  const call = client.Generate(makeRequest(opts, Number(opts['long-tokens']), 'example-cancel', false), metadata(opts),
                               { deadline: deadline(opts) });
  let cancelling = null;
  const done = printStream(call, (requestId, seen) => {
    if (cancelling || seen < after) return;
    cancelling = unary(client, 'Cancel', { request_id: requestId }, opts).then((reply) => {
      console.log(`cancel: request_id=${requestId} cancelled=${reply.cancelled}`);
    });
  });
  await done;
  if (cancelling) await cancelling;
}

async function runError(client, opts) {
  console.log('== error: a negative temperature, then Cancel of an unknown id');
  const bad = makeRequest(opts, 4, 'example-error', false);
  bad.sampling_params.temperature = -1;
  try {
    await printStream(client.Generate(bad, metadata(opts), { deadline: deadline(opts) }));
    console.log('error: none (the gateway accepted a negative temperature)');
  } catch (err) {
    console.log(`error: ${describeError(err)}`);
  }
  try {
    await unary(client, 'Cancel', { request_id: 'no-such-request' }, opts);
  } catch (err) {
    console.log(`error: ${describeError(err)}`);
  }
}

async function main() {
  const opts = options();
  const v1 = loadGateway();
  const client = new v1.Gateway(opts.address, credentials(opts));
  const modes = { stream: runStream, cancel: runCancel, error: runError };
  try {
    for (const [name, run] of Object.entries(modes)) {
      if (opts.mode === name || opts.mode === 'all') await run(client, opts);
    }
  } catch (err) {
    if (err.code === undefined) throw err;
    console.error(`error: ${describeError(err)}`);
    process.exitCode = 1;
  } finally {
    client.close();
  }
}

main().catch((err) => {
  console.error(err.message || err);
  process.exitCode = 1;
});
