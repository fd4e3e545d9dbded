-- wrk script: each request publishes one 1 KiB text message.
-- wrk -t1 -c64 -d8s -s bench/wrk/publish.lua http://127.0.0.1:PORT/v1/channels/bench/messages
wrk.method = "POST"
wrk.headers["Content-Type"] = "text/plain"
wrk.body = string.rep("x", 1024)
