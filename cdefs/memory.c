/*
 * A server that just ran a burst of TLS handshakes has freed most of what
 * they used, but glibc keeps freed chunks inside its heap (holes below the
 * top are never given back on their own), so RSS stays at the burst's peak.
 * malloc_trim(0) returns those pages to the kernel (madvise of free chunks
 * since glibc 2.8).  Other libcs (FreeBSD's jemalloc) purge dirty pages
 * themselves: there this reports "not supported".
 *
 * Returns 1 if memory was released, 0 if there was none, -1 if the C
 * library has no such call.
 */
#include <stdlib.h>
#if defined(__GLIBC__)
#include <malloc.h>
#endif

int bsd_ovpn_release_free_heap(void)
{
#if defined(__GLIBC__)
    return malloc_trim(0);
#else
    return -1;
#endif
}
