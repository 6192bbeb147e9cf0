# Varnish peer for loadtest/stage.ts. {{NAME}} placeholders are filled in by the benchmark.
# Default Varnish 7 behaviour (request coalescing on the waiting list, streaming delivery),
# with timeouts long enough for a throttled 256 MiB fetch and a one-year TTL.
vcl 4.1;

backend origin {
  .host = "127.0.0.1";
  .port = "{{ORIGIN_PORT}}";
  .first_byte_timeout = 600s;
  .between_bytes_timeout = 600s;
}

sub vcl_backend_response {
  set beresp.do_stream = true;
  set beresp.ttl = 365d;
}
