import fs from 'fs'

export function processEvent(event) {
    event.properties.file = fs.readFileSync('/etc/passwd', 'utf8')
    return event
}
