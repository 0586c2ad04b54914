// A js-libp2p peer for murmur's interop tests, driven by JSON lines on stdin
// (the same commands as tests/interop/py_peer.py). Listens on 127.0.0.1 unless
// told otherwise, speaks /noise + /yamux/1.0.0, serves an echo protocol,
// answers each command with one JSON line: {"ok": true, ...} or {"ok": false, "error": "..."}.
import { createInterface } from 'node:readline'
import { randomBytes } from 'node:crypto'
import { createLibp2p } from 'libp2p'
import { tcp } from '@libp2p/tcp'
import { noise } from '@chainsafe/libp2p-noise'
import { yamux } from '@chainsafe/libp2p-yamux'
import { identify } from '@libp2p/identify'
import { ping } from '@libp2p/ping'
import { circuitRelayServer, circuitRelayTransport } from '@libp2p/circuit-relay-v2'
import { dcutr } from '@libp2p/dcutr'
import { peerIdFromString } from '@libp2p/peer-id'
import { multiaddr } from '@multiformats/multiaddr'

const ECHO = '/murmur-interop/echo/1.0.0'
const STREAM_LIMITS = { maxInboundStreams: 256, maxOutboundStreams: 256 }
// `node peer.mjs --circuit <relay multiaddr>`: reserve on that relay and listen through it
const circuitAt = process.argv.indexOf('--circuit')
const CIRCUIT = circuitAt >= 0 ? process.argv[circuitAt + 1] : null
// `--listen <multiaddr>`: listen there instead (a host of the emulated internet);
// `--announce <multiaddr>`: the address its identify and DCUtR CONNECT give (a
// public host's own: js-libp2p lists a public listen address only once AutoNAT confirmed it);
// `--dcutr`: run @libp2p/dcutr, and the circuit relay transport it needs (the DCUtR interop test)
function option (name) {
  const at = process.argv.indexOf(name)
  return at >= 0 ? process.argv[at + 1] : null
}
const LISTEN = option('--listen') ?? '/ip4/127.0.0.1/tcp/0'
const ANNOUNCE = option('--announce')
const DCUTR = process.argv.includes('--dcutr')

const node = await createLibp2p({
  addresses: {
    listen: [LISTEN, ...(CIRCUIT ? [`${CIRCUIT}/p2p-circuit`] : [])],
    ...(ANNOUNCE ? { appendAnnounce: [ANNOUNCE] } : {})
  },
  // The tests dial this peer from 127.0.0.1 many times a second; js-libp2p
  // refuses (resets) more than 5 inbound connections a second per host by default.
  connectionManager: { inboundConnectionThreshold: 1000 },
  transports: [tcp(), ...(CIRCUIT || DCUTR ? [circuitRelayTransport()] : [])],
  connectionEncrypters: [noise()],
  streamMuxers: [yamux()],
  services: {
    identify: identify(),
    ping: ping(),
    ...(DCUTR ? { dcutr: dcutr() } : {}),
    // `node peer.mjs --relay`: also a circuit relay v2 server (the relay interop test)
    ...(process.argv.includes('--relay')
      ? { relay: circuitRelayServer({ reservations: { maxReservations: 16, defaultDataLimit: BigInt(4 << 20) } }) }
      : {})
  }
})

async function send (stream, data) {
  if (!stream.send(data)) await stream.onDrain()
}

async function readAll (stream) {
  const parts = []
  for await (const chunk of stream) parts.push(chunk.subarray())
  return Buffer.concat(parts)
}

await node.handle(ECHO, async (stream) => {
  try {
    for await (const chunk of stream) await send(stream, chunk.subarray())
    await stream.close()
  } catch (err) {
    stream.abort(err)
  }
}, { ...STREAM_LIMITS, runOnLimitedConnection: true })  // a relay's limited circuit too

function conn (peer) {
  const conns = node.getConnections(peerIdFromString(peer))
  if (conns.length === 0) throw new Error('not connected')
  return conns[0]
}

async function echo (peer, size) {
  const data = randomBytes(size)
  const stream = await conn(peer).newStream(ECHO, STREAM_LIMITS)
  const start = performance.now()
  const reading = readAll(stream)
  for (let i = 0; i < data.length; i += 65536) await send(stream, data.subarray(i, i + 65536))
  await stream.close()
  const got = await reading
  if (!got.equals(data)) throw new Error(`echo mismatch: sent ${data.length} got ${got.length}`)
  return (performance.now() - start) / 1000
}

const commands = {
  async dial ({ addr }) { await node.dial(multiaddr(addr)); return {} },
  async identify ({ peer }) {
    const r = await node.services.identify.identify(conn(peer))
    return {
      protocols: r.protocols,
      agent: r.agentVersion,
      protocol_version: r.protocolVersion,
      listen: r.listenAddrs.map(String),
      observed: r.observedAddr ? r.observedAddr.toString() : null,
      public_key: r.publicKey ? Buffer.from(r.publicKey).toString('hex') : null
    }
  },
  async ping ({ peer, count = 3 }) {
    const rtts = []
    for (let i = 0; i < count; i++) rtts.push(await node.services.ping.ping(peerIdFromString(peer)))
    return { rtts_ms: rtts }
  },
  async echo ({ peer, size }) { return { seconds: await echo(peer, size) } },
  async streams ({ peer, n, size }) {
    await Promise.all(Array.from({ length: n }, () => echo(peer, size)))
    return {}
  },
  async reset ({ peer }) {
    const victim = await conn(peer).newStream(ECHO, STREAM_LIMITS)
    const others = Array.from({ length: 10 }, () => echo(peer, 100_000))
    await send(victim, randomBytes(200_000))
    victim.abort(new Error('reset mid-transfer by the test'))
    await Promise.all(others)
    await echo(peer, 1000)
    return { connected: node.getConnections(peerIdFromString(peer)).length > 0 }
  },
  // every connection to `peer`: its remote address (a relayed one ends in /p2p-circuit/...),
  // direction and whether it is limited (a relay's circuit)
  async connections ({ peer }) {
    return {
      connections: node.getConnections(peerIdFromString(peer)).map(c => ({
        remote: c.remoteAddr.toString(), direction: c.direction, limited: c.limits != null, status: c.status
      }))
    }
  },
  async connected ({ peer }) { return { connected: node.getConnections(peerIdFromString(peer)).length > 0 } },
  async close ({ peer }) { await node.hangUp(peerIdFromString(peer)); return {} }
}

process.stdout.write(JSON.stringify({ ok: true, peer_id: node.peerId.toString(), addrs: node.getMultiaddrs().map(String) }) + '\n')
const lines = createInterface({ input: process.stdin })
for await (const line of lines) {
  const cmd = JSON.parse(line)
  if (cmd.cmd === 'quit') break
  let reply
  try {
    const run = commands[cmd.cmd]
    if (!run) throw new Error(`unknown command ${cmd.cmd}`)
    reply = { ok: true, ...(await run(cmd)) }
  } catch (err) {
    reply = { ok: false, error: `${err.name}: ${err.message}` }
  }
  process.stdout.write(JSON.stringify(reply) + '\n')
}
await node.stop()
process.exit(0)
