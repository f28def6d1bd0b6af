// Package cacheproxy serves ImageService from a gvfs.Proxy: a cache proxy
// (GVFS's second-level LAN cache, §3.2.1). Reads are answered from the
// proxy's caches and misses go to its upstream; publishing, write-back and
// deletion are forwarded. Because it speaks the same API as the image
// server, compute servers and other proxies use it as their upstream, so
// proxies chain. A request for a run of blocks goes upstream as a run, in
// the class its stream names (gvfs.ClassHeader).
package cacheproxy
