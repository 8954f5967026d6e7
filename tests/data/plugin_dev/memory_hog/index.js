export function processEvent(event) {
    const hog = []
    while (true) hog.push('x'.repeat(1000000) + hog.length)
}
