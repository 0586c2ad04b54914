// Node 20 lacks Promise.withResolvers (Node 22+), which libp2p 3's dependencies
// (it-queue, via mortice) call; this is its specified behaviour, nothing more.
if (typeof Promise.withResolvers !== 'function') {
  Promise.withResolvers = function withResolvers () {
    let resolve, reject
    const promise = new Promise((res, rej) => { resolve = res; reject = rej })
    return { promise, resolve, reject }
  }
}
