/* ifovpn.h: cffi declarations for the if_ovpn ioctl layer (bsd_ovpn/binding.py).
 *
 * The structs are FreeBSD's LP64 layouts under our own names (bsd_ovpn_*),
 * defined in ifovpn.c, so they exist -- and their sizes and offsets can be
 * tested -- on Linux too.  On FreeBSD ifovpn.c asserts at compile time that
 * they match the system's struct ifdrv / ifreq / if_clonereq exactly.
 */

#define BSD_OVPN_IFNAMSIZ 16

/* struct ifdrv (sys/net/if.h): 40 bytes on LP64. */
struct bsd_ovpn_ifdrv {
    char          ifd_name[16];
    unsigned long ifd_cmd;
    size_t        ifd_len;
    void         *ifd_data;
};

/* FreeBSD struct sockaddr: sa_len comes first, sa_family is one byte. */
struct bsd_ovpn_sockaddr {
    unsigned char sa_len;
    unsigned char sa_family;
    char          sa_data[14];
};

struct bsd_ovpn_ifreq_buffer {
    size_t length;
    void  *buffer;
};

/* struct ifreq: 32 bytes on LP64, ifr_name then a 16-byte union. */
struct bsd_ovpn_ifreq {
    char ifr_name[16];
    union {
        struct bsd_ovpn_sockaddr     ifru_addr;
        struct bsd_ovpn_ifreq_buffer ifru_buffer;
        short                        ifru_flags[2];
        short                        ifru_index;
        int                          ifru_metric;
        int                          ifru_mtu;
        char                        *ifru_data;   /* SIOCSIFNAME: the new name */
        int                          ifru_cap[2];
        unsigned int                 ifru_fib;
    } ifr_ifru;
};

/* struct if_clonereq (SIOCIFGCLONERS): 16 bytes on LP64. */
struct bsd_ovpn_if_clonereq {
    int   ifcr_total;
    int   ifcr_count;
    char *ifcr_buffer;
};

/* ioctl request numbers, computed in ifovpn.c from FreeBSD's _IOW/_IOWR
 * encoding and the struct sizes above (checked against <sys/sockio.h> on
 * FreeBSD). */
#define BSD_OVPN_SIOCSDRVSPEC ...
#define BSD_OVPN_SIOCGDRVSPEC ...
#define BSD_OVPN_SIOCIFCREATE2 ...
#define BSD_OVPN_SIOCIFDESTROY ...
#define BSD_OVPN_SIOCSIFNAME ...
#define BSD_OVPN_SIOCIFGCLONERS ...

/* 1 when compiled on FreeBSD, else 0: the C-level guard behind binding.py's. */
int bsd_ovpn_is_freebsd(void);
/* ioctl(2) with one pointer argument; -1 and errno on failure.  Off FreeBSD
 * it refuses with ENOSYS without calling the kernel, because these request
 * numbers mean other things on other systems. */
int bsd_ovpn_ioctl(int fd, unsigned long request, void *arg);
/* kldload(2) (FreeBSD); -1/ENOSYS elsewhere. */
int bsd_ovpn_kldload(const char *file);
