/* Heap housekeeping for long-running daemons (memory.c). */
int bsd_ovpn_release_free_heap(void);
