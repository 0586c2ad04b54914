// The loader half of private-ranges.mjs (read that file first): rewrites only
// the '198.18.0.0/15' entry of @libp2p/utils/dist/src/private-ip.js, and fails
// loudly if that entry is not there exactly once (another version of the file).
const TARGET = /\/@libp2p\/utils\/dist\/src\/private-ip\.js$/
const ENTRY = "'198.18.0.0/15',"

export async function load (url, context, nextLoad) {
  const loaded = await nextLoad(url, context)
  if (!url.startsWith('file:') || !TARGET.test(new URL(url).pathname)) return loaded
  const source = typeof loaded.source === 'string' ? loaded.source : Buffer.from(loaded.source).toString('utf8')
  const found = source.split(ENTRY).length - 1
  if (found !== 1) throw new Error(`private-ranges hook: ${ENTRY} found ${found} times in ${url}, expected once`)
  process.stderr.write(`private-ranges hook: ${ENTRY} removed from ${url}\n`)
  return { ...loaded, source: source.replace(ENTRY, ''), shortCircuit: true }
}
