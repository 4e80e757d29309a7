#!/usr/bin/env python3
# ruff: noqa: E501, E731  (a data table: one channel per line reads best)
"""Regenerate schemas/asyncapi.yaml from schemas/json and the channel table below.

Run after adding a message type: python scripts/gen-asyncapi.py
"""
import json
import pathlib

import yaml

root = pathlib.Path(__file__).resolve().parent.parent / "schemas"
names = sorted(p.stem for p in (root/"json").glob("*.json") if p.stem != "envelope")
def mid(n): return n.replace(".", "_")
messages = {}
for n in names:
    s = json.loads((root/"json"/f"{n}.json").read_text())
    messages[mid(n)] = {"name": n, "title": n, "summary": s.get("description", ""),
                        "contentType": "application/json",
                        "payload": {"$ref": f"./json/{n}.json"}}
P = lambda d: {"description": d}
# Administration (coordinator/admin.py): admins only, others get error forbidden.
ADMIN_REQUESTS = ["principals.add","principals.rotate","principals.revoke","principals.list","mosquitto.export","workers.forget"]
ADMIN_REPLIES = ["principals.token","principals.list.reply","mosquitto.export.reply"]
# File transfers (broker/transfer, docs/transfer.md): any component can be either end.
XFER = ["xfer.init","xfer.state","xfer.ack","xfer.status","xfer.fin","xfer.abort","xfer.fetch"]
# Data objects (coordinator/data_service.py, docs/data.md): clients and admins.
DATA_REQUESTS = ["data.list","data.show","data.rm","data.pin","data.share"]
DATA_REPLIES = ["data.list.reply","data.show.reply"]
# Applications (coordinator/app_requests.py, docs/data.md "Applications"): clients and admins.
APP_REQUESTS = ["apps.add","apps.list","apps.show","apps.rm"]
APP_REPLIES = ["apps.list.reply","apps.show.reply"]
# Batch jobs (coordinator/job_requests.py, scheduler.py; docs/jobs.md).
JOB_REQUESTS = ["jobs.submit","jobs.list","jobs.show","jobs.cancel","jobs.hold","jobs.release","jobs.why","jobs.summary"]
JOB_REPLIES = ["jobs.submitted","jobs.list.reply","jobs.show.reply","jobs.why.reply","jobs.summary.reply"]
JOB_WORKER_REQUESTS = ["job.assign","job.kill"]
ATTEMPT_REPORTS = ["attempt.started","attempt.report"]
JOB_FOLLOW = ["job.follow"]  # a job's owner follows its running attempt (worker/job_follow.py)
# Segments are the one non-JSON payload: raw bytes, metadata in the topic.
messages["xfer_segment"] = {"name": "xfer.segment", "title": "xfer.segment",
    "summary": "One segment of a file: the raw bytes (no envelope, no JSON). The topic carries the sender, tid, byte offset (decimal, a multiple of the transfer's segment_size) and the CRC-32 of the bytes (8 lowercase hex digits). Length = min(segment_size, size - offset). QoS 1, never retained. The receiver drops (and logs) anything that does not match a transfer it knows from that sender.",
    "contentType": "application/octet-stream", "payload": {"type": "string", "format": "binary", "maxLength": 2097152}}
XFER_PARAMS = {"sender": "principal id of the publisher (enforced by the broker ACL)", "tid": "transfer id", "offset": "byte offset of the segment, decimal", "crc32": "CRC-32 of the payload, 8 lowercase hex digits"}
channels = {
  "coordStatus": ("{root}/coord/status", "Coordinator presence (retained; its last will says down). QoS 1.", ["coord.status"], {}),
  "coordPubkey": ("{root}/coord/pubkey", "The coordinator's Ed25519 grant-verification key (retained). QoS 1.", ["coord.pubkey"], {}),
  "coordInbox": ("{root}/coord/inbox/{sender}", "Requests and reports to the coordinator. `sender` is the publisher's principal id, enforced by the broker ACL. QoS 1.",
      ["ping","workers.list","workers.show","workers.drain","reserve","renew","release","reservations.list","client.hello","client.accepts","client.gone","exec.report","audit.list",*ADMIN_REQUESTS,*XFER,*DATA_REQUESTS,*APP_REQUESTS,*JOB_REQUESTS,*ATTEMPT_REPORTS,"ok","error","exec.started"], {"sender": "principal id of the publisher"}),
  "workerStatus": ("{root}/worker/{wid}/status", "Worker presence (retained; last will = offline, clean=false). QoS 1.", ["worker.status"], {"wid": "worker id (= its principal id)"}),
  "workerCaps": ("{root}/worker/{wid}/caps", "Worker capability document (retained). QoS 1.", ["worker.caps"], {"wid": "worker id"}),
  "workerHeartbeat": ("{root}/worker/{wid}/heartbeat", "Live metrics every heartbeat interval. QoS 0, not retained.", ["worker.heartbeat"], {"wid": "worker id"}),
  "workerInbox": ("{root}/worker/{wid}/inbox/{sender}", "Messages to a worker: from the coordinator (caps.refresh, reservation.open/close, ping) and from the grant holder (exec.*). QoS 1.",
      ["caps.refresh","ping","reservation.open","reservation.close","exec.start","exec.signal","exec.list","exec.logs","exec.stdin","exec.resize",*XFER,*JOB_WORKER_REQUESTS,*JOB_FOLLOW,"workdir.fetch","attempt.recorded","ok","error"], {"wid": "worker id", "sender": "principal id of the publisher"}),
  "clientInbox": ("{root}/client/{cid}/inbox/{sender}", "Replies, exec output streams and notifications to a client. QoS 1.",
      ["pong","workers.list.reply","workers.show.reply","reserve.reply","reservations.list.reply","reservation.ended","exec.started","exec.output","exec.exit","exec.list.reply","exec.logs.reply","exec.stdin.ack","audit.list.reply",*ADMIN_REPLIES,*XFER,*DATA_REPLIES,*APP_REPLIES,*JOB_REPLIES,"job.event","job.events","job.output","ok","error"], {"cid": "client principal id", "sender": "principal id of the publisher"}),
  "brokerRecheck": ("{root}/broker/recheck", "Coordinator/admin -> embedded broker: re-authenticate these principals' live sessions and cut those that no longer pass (after a revoke). Only coordinator and admin principals may publish. QoS 1.", ["broker.recheck"], {}),
  "workerEvents": ("{root}/event/worker/{wid}", "Worker state changes for watchers. QoS 0.", ["event.worker"], {"wid": "worker id"}),
  "adminJobEvents": ("{root}/events/jobs", "Every job's state changes, once each, several per `job.events` (the admins' feed: `xcloud jobs --watch --all`). Only the coordinator publishes, only admins subscribe (broker ACL). QoS 0.", ["job.events"], {}),
  "coordXfer": ("{root}/coord/xfer/{sender}/{tid}/{offset}/{crc32}", "File segments to the coordinator (uploads; docs/transfer.md). Raw bytes. A principal publishes only under its own id; only the coordinator subscribes.", ["xfer.segment"], XFER_PARAMS),
  "workerXfer": ("{root}/worker/{wid}/xfer/{sender}/{tid}/{offset}/{crc32}", "File segments to a worker (its downloads from the coordinator, a client's put). Raw bytes. Only that worker subscribes.", ["xfer.segment"], {"wid": "worker id", **XFER_PARAMS}),
  "clientXfer": ("{root}/client/{cid}/xfer/{sender}/{tid}/{offset}/{crc32}", "File segments to a client (its downloads from the coordinator or a reserved worker). Raw bytes. Only that client subscribes.", ["xfer.segment"], {"cid": "client principal id", **XFER_PARAMS}),
}
used = set()
chan_out = {}
for cid, (addr, desc, msgs, params) in channels.items():
    used.update(msgs)
    ch = {"address": addr, "description": desc,
          "messages": {mid(m): {"$ref": f"#/components/messages/{mid(m)}"} for m in msgs},
          "parameters": {"root": {"description": "topic root of the grid (default xcloud)"}, **{k: {"description": v} for k, v in params.items()}}}
    chan_out[cid] = ch
missing = set(names) - used
assert not missing, missing
ops = {}
def op(name, action, ch, msgs, summary, reply=None):
    o = {"action": action, "channel": {"$ref": f"#/channels/{ch}"}, "summary": summary,
         "messages": [{"$ref": f"#/channels/{ch}/messages/{mid(m)}"} for m in msgs]}
    if reply:
        o["reply"] = {"channel": {"$ref": f"#/channels/{reply[0]}"}, "messages": [{"$ref": f"#/channels/{reply[0]}/messages/{mid(m)}"} for m in reply[1]]}
    ops[name] = o
op("sendCoordinatorRequest", "send", "coordInbox", ["ping","workers.list","workers.show","workers.drain","reserve","renew","release","reservations.list","audit.list"],
   "A client asks the coordinator; the reply goes to the client's inbox (reply_to).",
   ("clientInbox", ["pong","workers.list.reply","workers.show.reply","reserve.reply","reservations.list.reply","audit.list.reply","ok","error"]))
op("sendAdminRequest", "send", "coordInbox", ADMIN_REQUESTS,
   "An admin manages principals or exports the Mosquitto files; anyone else gets error forbidden. A revoke or rotation is followed by broker.recheck.",
   ("clientInbox", [*ADMIN_REPLIES,"ok","error"]))
op("askBrokerRecheck", "send", "brokerRecheck", ["broker.recheck"], "After a revoke or rotation the coordinator asks the embedded broker to cut the principal's live sessions.")
op("announceClient", "send", "coordInbox", ["client.hello","client.accepts","client.gone"], "A client connection says hello on connect (and when a coordinator comes up), then which optional message types it accepts (`job.events`); its last will says gone.")
op("reportExec", "send", "coordInbox", ["exec.report"], "A worker reports a finished command for the audit trail.")
op("publishWorkerPresence", "send", "workerStatus", ["worker.status"], "A worker publishes its presence.")
op("publishWorkerCaps", "send", "workerCaps", ["worker.caps"], "A worker publishes its capabilities.")
op("publishHeartbeat", "send", "workerHeartbeat", ["worker.heartbeat"], "A worker publishes live metrics.")
op("sendWorkerRequest", "send", "workerInbox", ["caps.refresh","ping","reservation.open","reservation.close","exec.start","exec.signal","exec.list","exec.logs","exec.stdin","exec.resize"],
   "The coordinator or the grant holder sends a request to a worker.",
   ("clientInbox", ["exec.started","exec.list.reply","exec.logs.reply","exec.stdin.ack","pong","ok","error"]))
op("streamExecOutput", "send", "clientInbox", ["exec.output","exec.exit"], "A worker streams a command's output and exit to the client.")
op("notifyReservationEnded", "send", "clientInbox", ["reservation.ended"], "The coordinator tells a holder that its reservation ended.")
op("publishCoordStatus", "send", "coordStatus", ["coord.status"], "The coordinator publishes its presence.")
op("publishCoordPubkey", "send", "coordPubkey", ["coord.pubkey"], "The coordinator publishes its grant key.")
op("sendDataRequest", "send", "coordInbox", DATA_REQUESTS,
   "A client lists, shows, removes, pins or shares its data objects (docs/data.md); the bytes move with xfer.* (purpose kind data).",
   ("clientInbox", [*DATA_REPLIES,"ok","error"]))
op("sendJobRequest", "send", "coordInbox", JOB_REQUESTS,
   "A client submits, lists, shows, cancels, holds or releases batch jobs (docs/jobs.md).",
   ("clientInbox", [*JOB_REPLIES,"ok","error"]))
op("notifyJobEvent", "send", "clientInbox", ["job.event","job.events"], "The coordinator tells a job's owner of each state change of its job: several per `job.events` when every session of the owner accepts them, else one `job.event` each.")
op("followJob", "send", "workerInbox", JOB_FOLLOW,
   "A job's owner asks the worker running its attempt for the attempt's output so far and live (only the owner; a few followers per attempt).",
   ("clientInbox", ["ok","error"]))
op("streamJobOutput", "send", "clientInbox", ["job.output"], "A worker streams a followed attempt's stdout and stderr (offsets per stream), then a last message with eof.")
op("assignJob", "send", "workerInbox", JOB_WORKER_REQUESTS,
   "The coordinator assigns an attempt to a worker (its ok, or the attempt's accepted report, is the acknowledgement) or kills one; to workers of agent_version 0.3 or later the next assignments also ride in attempt.recorded.",
   ("coordInbox", ["ok","error"]))
op("reportAttempt", "send", "coordInbox", ATTEMPT_REPORTS,
   "A worker says an attempt started, and how it ended (re-sent until answered; only the attempt's worker may). A report is answered attempt.recorded (workers of agent_version 0.3 or later: with the next job.assign messages for the slots it freed) or ok.",
   ("workerInbox", ["attempt.recorded","ok","error"]))
op("sendAppRequest", "send", "coordInbox", APP_REQUESTS,
   "A client registers, lists, shows or removes applications (docs/data.md, Applications); their binaries and image archives are data objects.",
   ("clientInbox", [*APP_REPLIES,"ok","error"]))
op("offerTransfer", "send", "coordInbox", ["xfer.init","xfer.status","xfer.fin","xfer.abort"],
   "The sender of a file (here a client or worker uploading to the coordinator; the same towards a worker or a client) offers it, asks for the receiver's ranges, finishes or aborts.",
   ("clientInbox", ["xfer.state","ok","error"]))
op("requestDownload", "send", "coordInbox", ["xfer.fetch"],
   "A downloader asks a holder (the coordinator, or a reserved worker on its inbox) to describe a file and stream the ranges it lacks.",
   ("clientInbox", ["xfer.init","error"]))
op("placeData", "send", "workerInbox", ["workdir.fetch"],
   "A reservation's holder asks its worker to place a data object of the coordinator's store in the work directory (the worker fetches it through its input cache).",
   ("clientInbox", ["ok","error"]))
op("acknowledgeSegments", "send", "clientInbox", ["xfer.ack"], "The receiver tells the sender which ranges are durable (every few segments or ~50 ms).")
op("streamSegmentsToCoordinator", "send", "coordXfer", ["xfer.segment"], "A sender streams segments, a window at a time, to the coordinator.")
op("streamSegmentsToWorker", "send", "workerXfer", ["xfer.segment"], "The coordinator or a grant holder streams segments to a worker.")
op("streamSegmentsToClient", "send", "clientXfer", ["xfer.segment"], "The coordinator or a reserved worker streams segments to a client.")
op("publishWorkerEvent", "send", "workerEvents", ["event.worker"], "The coordinator announces worker state changes.")
op("publishAdminJobEvent", "send", "adminJobEvents", ["job.events"], "The coordinator publishes each job state change once on the admins' feed, several per message (docs/security.md).")
doc = {
  "asyncapi": "3.0.0",
  "info": {"title": "xcloud wire protocol", "version": "1.0.0",
           "description": "MQTT 3.1.1 topics and JSON messages between xcloud components. Every message carries type, v, id, ts (see json/envelope.json); requests add reply_to (a base inbox topic), replies add re. Inbox topics end in the sender's principal id, which the broker's ACL enforces; see docs/protocol.md."},
  "defaultContentType": "application/json",
  "servers": {"embedded": {"host": "127.0.0.1:1883", "protocol": "mqtt", "protocolVersion": "3.1.1",
                           "description": "The embedded amqtt broker started by `xcloud up` (any MQTT 3.1.1 broker works: Mosquitto, EMQX, HiveMQ, VerneMQ).",
                           "security": [{"$ref": "#/components/securitySchemes/token"}]}},
  "channels": chan_out,
  "operations": ops,
  "components": {"messages": messages,
                 "securitySchemes": {"token": {"type": "userPassword", "description": "MQTT username = principal id, password = its token (only hashes are stored)."}}},
}
(root/"asyncapi.yaml").write_text("# Generated from schemas/json and the channel table in docs/protocol.md; keep both in step.\n" + yaml.safe_dump(doc, sort_keys=False, width=100))
print("channels", len(chan_out), "messages", len(messages))
