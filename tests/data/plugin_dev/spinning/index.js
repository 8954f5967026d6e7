export function processEvent(event) {
    while (true) {}
}
