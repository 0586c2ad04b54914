// The one deviation from stock js-libp2p in murmur's DCUtR interop test
// (tests/interop/test_dcutr_interop.py): `node --import ./private-ranges.mjs`
// registers a module customization hook (Node 20 `module.register`) that, at
// load time, drops the single entry '198.18.0.0/15' from the private ranges of
// @libp2p/utils' private-ip.js. Nothing else is changed and no file under
// node_modules is touched.
//
// Why: murmur's emulated internet puts its public segment on 198.18.0.0/15
// (RFC 2544's benchmarking range, reserved so that a test never routes to a
// real address). @libp2p/dcutr keeps only addresses that `isPublicAndDialable`
// accepts, and @libp2p/utils lists 198.18.0.0/15 as private, so a stock
// js-libp2p would neither take a CONNECT's addresses there nor upgrade
// unilaterally to them: on the emulated internet every DCUtR with js-libp2p
// would stop at that filter. The test also runs js-libp2p without this hook
// and shows exactly that.
import { register } from 'node:module'

register('./private-ranges-loader.mjs', import.meta.url)
