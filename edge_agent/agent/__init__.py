"""The camera-host daemon: outbox, uplink, commands, live config, HTTP, cameras."""
