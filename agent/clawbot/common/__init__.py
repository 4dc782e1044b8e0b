"""Code every side runs: the config contract (config, validate, jsonpos, schemadocs), TLS (pki, mtls), model
sizing and GGUF reading (sizing, chattemplate), the fit check (preflight) and the gateway client (modelclient)."""
