#!/usr/bin/env python3
"""Prints N demo events in one of the two shapes the server consumes:
  celery QUEUE COUNT: Redis commands that LPUSH `process_event_with_plugins` Celery tasks onto QUEUE,
      in the exact envelope Python Celery (kombu JSON, protocol 2, base64 body) writes; pipe into
      `redis-cli`.
  kafka TOPIC COUNT: one JSON message per line as PostHog's capture endpoint produces to
      events_plugin_ingestion (the event itself as a JSON string in `data`); pipe into `kcat -P`."""
import base64, datetime, json, random, sys, uuid

mode, queue, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
now = datetime.datetime.now(datetime.timezone.utc)
iso = lambda moment: moment.isoformat().replace("+00:00", "Z")
for index in range(count):
    distinct_id = f"demo-user-{random.randint(1, 50)}"
    name = random.choice(["$pageview", "$pageview", "clicked button", "demo signup"])
    data = {"event": name, "distinct_id": distinct_id, "timestamp": iso(now),
            "properties": {"$current_url": f"https://demo.example.com/page/{index % 7}", "$lib": "web",
                           "distinct_id": distinct_id, "token": "demo-token"}}
    if name == "demo signup":
        data["properties"]["$set"] = {"email": f"{distinct_id}@example.com"}
    if mode == "kafka":
        print(json.dumps({"uuid": str(uuid.uuid4()), "distinct_id": distinct_id, "ip": "127.0.0.1",
                          "site_url": "https://demo.example.com", "data": json.dumps(data), "team_id": 2,
                          "now": now.isoformat(), "sent_at": iso(now)}))
        continue
    args = [distinct_id, "127.0.0.1", "https://demo.example.com", data, 2, now.isoformat(), iso(now)]
    body = base64.b64encode(json.dumps([args, {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]).encode()).decode()
    task_id = str(uuid.uuid4())
    message = {"body": body, "content-encoding": "utf-8", "content-type": "application/json",
               "headers": {"lang": "py", "task": "posthog.tasks.process_event.process_event_with_plugins", "id": task_id,
                           "retries": 0, "root_id": task_id, "parent_id": None, "group": None},
               "properties": {"correlation_id": task_id, "delivery_mode": 2, "priority": 0, "body_encoding": "base64",
                              "delivery_info": {"exchange": "", "routing_key": queue}, "delivery_tag": str(uuid.uuid4())}}
    encoded = json.dumps(message).replace("\\", "\\\\").replace('"', '\\"')
    print(f'LPUSH {queue} "{encoded}"')
